"""The reduced soak: mixed REST, V2 and batch traffic at 70 % of measured capacity, with a hot
reload every 30 s, against a real ``tinyserve serve``. Nothing may fail, and open files and
threads stay flat. 120 s in CI, 20 s elsewhere (TINYSERVE_SOAK_S sets it);
``make reliability`` runs it for 10 minutes and puts the figures in RESULTS.md."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import reliability  # noqa: E402

SECONDS = float(os.environ.get("TINYSERVE_SOAK_S") or (120 if os.environ.get("CI") else 20))


@pytest.mark.slow
def test_a_soak_with_hot_reloads_fails_nothing_and_stays_flat(tmp_path: Path) -> None:
    figures = reliability.soak(SECONDS, tmp_path)
    statuses = figures["statuses"]
    assert figures["failed"] == 0, statuses
    assert statuses.get("reload 200", 0) >= 2, statuses  # every 30 s, or a third of the soak
    assert figures["answered"] >= 0.8 * figures["rate_rps"] * SECONDS, figures
    start, end = figures["start"], figures["end"]
    assert end["process_open_fds"] <= start["process_open_fds"] + 2, figures
    assert end["tinyserve_threads"] <= start["tinyserve_threads"] + 2, figures
    # RSS is reported by `make reliability`, not asserted here: its growth follows the request
    # rate, i.e. this machine's speed (RESULTS.md "Reliability" has the open defect).
