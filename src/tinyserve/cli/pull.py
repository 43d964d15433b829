"""``tinyserve pull``: copy a model repository from S3 into a local folder (an init step)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tinyserve.errors import ConfigError


def pull(
    source: Annotated[str, typer.Argument(help="s3://BUCKET/PREFIX holding <name>/<version>/.")],
    dest: Annotated[Path, typer.Argument(help="Local folder to serve with --repo DEST.")],
) -> None:
    """Mirror an S3 model repository into DEST, then exit (e.g. a Kubernetes init container).

    Unchanged files are kept (size and ETag), changed ones downloaded again, and model files
    no longer in SOURCE removed, so DEST ends up exactly what `serve --repo SOURCE` would read.
    """
    from tinyserve.sources import is_remote, sync

    if not is_remote(source):
        raise ConfigError(f"{source!r} is not an s3:// URI; a local folder is served in place")
    result = sync(source, into=dest)
    typer.echo(
        f"{source} -> {result.path}: {len(result.downloaded)} downloaded, "
        f"{len(result.reused)} unchanged, {len(result.removed)} removed"
    )
