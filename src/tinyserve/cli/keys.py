"""``tinyserve keys``: create, list and revoke the API keys of a key file (``tinyserve.auth``).

The key is printed once, by ``create``; the file keeps only its SHA-256. A running server
sees a change when it re-reads the file: SIGHUP, or ``POST /admin/keys/reload``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="keys",
    help="Create, list and revoke API keys (a server reads them with --api-keys FILE).",
    no_args_is_help=True,
)

FileOption = Annotated[
    Path,
    typer.Option(
        "--file", "-f", help="The key file the server reads.", envvar="TINYSERVE_API_KEYS"
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]
_RELOAD = "running servers notice after SIGHUP or POST /admin/keys/reload"


@app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="Who or what the key is for (shown in /metrics).")],
    file: FileOption,
    scope: Annotated[
        list[str] | None,
        typer.Option("--scope", help="predict or admin; repeat for both \\[default: predict]."),
    ] = None,
    rate: Annotated[float, typer.Option(help="Requests per second; 0 = no limit.")] = 0.0,
    burst: Annotated[
        int, typer.Option(help="Requests at once \\[default: one second's worth].")
    ] = 0,
    quota: Annotated[int, typer.Option(help="Requests per --period; 0 = no quota.")] = 0,
    period: Annotated[str, typer.Option(help="The quota's period: day or month (UTC).")] = "day",
    json_output: JsonOption = False,
) -> None:
    """Add a key and print it: this is the only time it is shown."""
    import orjson

    from tinyserve.auth import create_key

    key, secret = create_key(file, name, scope or ["predict"], rate, burst, quota, period)
    if json_output:
        summary = {"key": secret, **{k: v for k, v in key.to_json().items() if k != "sha256"}}
        typer.echo(orjson.dumps(summary).decode())
        return
    typer.echo(secret)
    typer.echo(
        f"created key {key.name!r} (id {key.id}, scopes {', '.join(key.scopes)}) in {file}; "
        f"the key above is shown only now, keep it; {_RELOAD}",
        err=True,
    )


@app.command("list")
def list_keys(
    file: FileOption,
    all_keys: Annotated[bool, typer.Option("--all", help="Include revoked keys.")] = False,
    json_output: JsonOption = False,
) -> None:
    """The keys of the file: name, id, scopes, limits, dates (never a key or its hash)."""
    import orjson

    from tinyserve.auth import read_keys

    keys = [k for k in read_keys(file) if all_keys or k.revoked is None]
    rows = [{k: v for k, v in key.to_json().items() if k != "sha256"} for key in keys]
    if json_output:
        for row in rows:
            typer.echo(orjson.dumps(row).decode())
        return
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for column in ("name", "id", "scopes", "rate/s", "burst", "quota", "created", "revoked"):
        table.add_column(column)
    for key in keys:
        quota = f"{key.quota}/{key.period}" if key.quota else "-"
        table.add_row(key.name, key.id, ",".join(key.scopes), f"{key.rate:g}" if key.rate else "-",
                      f"{key.capacity:g}" if key.rate else "-", quota, key.created,
                      key.revoked or "")  # fmt: skip
    Console().print(table)


@app.command("revoke")
def revoke(
    key: Annotated[str, typer.Argument(help="The name or id of the key.")],
    file: FileOption,
) -> None:
    """Mark a key revoked; servers refuse it once they re-read the file."""
    from tinyserve.auth import revoke_key

    revoked = revoke_key(file, key)
    typer.echo(f"revoked key {revoked.name!r} (id {revoked.id}); {_RELOAD}")
