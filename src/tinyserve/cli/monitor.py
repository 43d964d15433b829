"""``tinyserve monitor``: a live terminal view of one or more running servers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tinyserve.cli.options import build_config

if TYPE_CHECKING:
    from tinyserve.monitor import Sample


def monitor(
    urls: Annotated[
        list[str], typer.Argument(help="Server base URLs, e.g. http://127.0.0.1:8000.")
    ],
    interval: Annotated[float, typer.Option(help="Seconds between rounds.")] = 2.0,
    count: Annotated[int, typer.Option(help="Stop after N rounds; 0 = until Ctrl-C.")] = 0,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each server.")] = 5.0,
    jsonl: Annotated[
        Path | None, typer.Option(help="Append every server's snapshot as a JSON line.")
    ] = None,
) -> None:
    """Health, requests/s, p50/p99, errors, batch sizes, queue, memory and CPU, live."""
    import asyncio

    from rich.console import Console
    from rich.live import Live

    from tinyserve.monitor import MonitorConfig, render
    from tinyserve.monitor import monitor as run

    config = build_config(
        MonitorConfig,
        urls=tuple(u.rstrip("/") for u in urls),
        interval=interval,
        count=count,
        timeout=timeout,
        jsonl=jsonl,
    )
    console = Console()
    with Live(render([]), console=console, auto_refresh=False) as live:

        def show(samples: Sequence[Sample]) -> None:
            live.update(render(samples), refresh=True)

        try:
            asyncio.run(run(config, show))
        except KeyboardInterrupt:
            pass
