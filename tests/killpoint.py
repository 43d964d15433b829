"""Run a ``tinyserve`` command and SIGKILL it at one exact step: the first audit event
(``open``, ``os.mkdir``, ``os.rename``...) whose path matches a pattern.

    python tests/killpoint.py EVENT GLOB tinyserve-args...

Python's audit hooks see every file the real command opens, creates or renames, before the
operation happens, so the kill lands on that step every time, on any machine.
"""

from __future__ import annotations

import fnmatch
import os
import signal
import sys


def main() -> None:
    event, pattern, *args = sys.argv[1:]

    def hook(name: str, hook_args: tuple[object, ...]) -> None:
        if name != event or not hook_args:
            return
        path = hook_args[0]
        if isinstance(path, bytes):
            path = path.decode(errors="replace")
        if isinstance(path, str | os.PathLike) and fnmatch.fnmatch(os.fspath(path), pattern):
            os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)
    from tinyserve.cli import main as tinyserve

    sys.argv = ["tinyserve", *args]
    tinyserve()


if __name__ == "__main__":
    main()
