"""What every command shares: the Typer apps, the consoles, the workspace options and the small helpers.

Only the config loads at import time: `persona --help` must stay fast, so the stores, the gate and
the models are imported inside the helpers that need them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from core import config as config_mod

app = typer.Typer(help="Persona: user profiling and personalised ranking for online shops.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
quarantine_app = typer.Typer(help="Inspect and replay quarantined rows.", no_args_is_help=True)
suites_app = typer.Typer(help="Great Expectations suites of the input contract.", no_args_is_help=True)
features_app = typer.Typer(help="Feast features: apply the repo, build from the event log, materialize.",
                           no_args_is_help=True)
app.add_typer(quarantine_app, name="quarantine")
app.add_typer(features_app, name="features")
app.add_typer(suites_app, name="suites")
console = Console()
err = Console(stderr=True, soft_wrap=True)

Workspace = Annotated[Path, typer.Option("--workspace", "-w", help="Folder holding one dataset's "
                                         "event log, stores, models and reports.")]
Profile = Annotated[str | None, typer.Option("--profile", help="Store profile: local, prod or spark "
                                             "(default: the workspace's persona.yaml).")]
DEFAULT_WS = Path("workspace")


def _config(workspace: Path, profile: str | None = None) -> config_mod.Config:
    try:
        return config_mod.load(workspace, profile)
    except ValueError as exc:
        _fail(str(exc))


def _fail(message: str, code: int = 2):
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _event_log(cfg: config_mod.Config):
    from eventlog.store import EventLog

    return EventLog(cfg.resolved_event_log_url())


def _privacy(cfg: config_mod.Config):
    from core.privacy import Privacy

    try:
        privacy = Privacy.for_workspace(cfg.workspace, cfg)
    except ValueError as exc:
        _fail(str(exc))
    from eventlog import tombstones

    log = _event_log(cfg)
    try:  # tombstones are hashed with the log's salt, which every workspace sharing the log uses
        return tombstones.bound_to_log(privacy, log.engine)
    finally:
        log.dispose()


def _gate(cfg: config_mod.Config):
    from validation.gate import Gate, GateSettings

    v = cfg.validation
    return Gate(GateSettings(v.max_reject_share, v.clock_skew_minutes, v.on_schema_drift,
                             max_quarantined_rows=v.max_quarantined_rows, event_types=cfg.event_types))


def _load(source: str):
    from eventlog.sources import StructuralError, load_batch

    try:
        return load_batch(source)
    except StructuralError as exc:
        _fail(f"{exc}\nNothing was written.")
