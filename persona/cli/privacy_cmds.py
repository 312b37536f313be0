"""A user's rights: forget (erase everywhere, leave a tombstone) and export (everything held, as JSON)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from persona.cli.common import DEFAULT_WS, Profile, Workspace, _config, _fail, app, console, err


@app.command()
def forget(
    user: Annotated[list[str], typer.Option("--user", help="A user id to erase (repeat for several).")],
    workspace: Workspace = DEFAULT_WS,
    profile: Profile = None,
    reason: Annotated[str | None, typer.Option(help="Why (kept with the tombstone, e.g. a ticket number).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Erase users everywhere (event log, quarantine, offline and online stores, reports, checkpoints).

    Leaves a tombstone (a salted hash and the time). Idempotent: re-run until it says complete."""
    from privacy.forget import forget as run_forget

    cfg = _config(workspace, profile)
    try:
        report = run_forget(cfg, user, reason)
    except ValueError as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps(report.to_dict(), default=str))
    else:
        console.print(f"erased {report.users} user(s): {report.event_log.get('events', 0)} events, "
                      f"{report.event_log.get('quarantine', 0)} quarantined rows, {report.online} online rows, "
                      f"{sum(report.offline.values())} offline rows, {len(report.files_changed)} files scrubbed, "
                      f"{len(report.files_deleted)} deleted", highlight=False)
    if not report.complete:
        err.print("[bold red]erasure incomplete:[/] " + "; ".join(report.remaining) + ". Re-run `persona forget`.",
                  highlight=False)
        raise typer.Exit(1)


@app.command()
def export(
    user: Annotated[str, typer.Option("--user", help="The user id.")],
    output: Annotated[Path, typer.Option(help="A .json file.")],
    workspace: Workspace = DEFAULT_WS,
    profile: Profile = None,
) -> None:
    """Everything Persona holds about a user (raw rows, offline and online features, tags) as JSON."""
    from privacy.export import export_with_ranking, write

    cfg = _config(workspace, profile)
    if output.is_dir():
        _fail(f"--output {output} is a folder: give a file name, such as {output / 'export.json'}")
    try:
        data = export_with_ranking(cfg, user)
        write(data, output)
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    console.print(f"wrote {output}: {len(data['raw']['events'])} events", highlight=False)
