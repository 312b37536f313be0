"""`persona quickstart`: every stage once, on generated sample data, by calling the commands themselves."""

from __future__ import annotations

import time

from persona.cli.common import DEFAULT_WS, Workspace, _config, app, console
from persona.cli.data import SampleLocale, generate, ingest, status, validate
from persona.cli.features import features_apply, features_build, features_materialize
from persona.cli.models import train_cmd
from persona.cli.serving import build_bento


@app.command()
def quickstart(
    workspace: Workspace = DEFAULT_WS,
    users: int = 1000,
    items: int = 500,
    days: int = 30,
    seed: int = 0,
    locale: SampleLocale = "en",
) -> None:
    """Run the whole pipeline on generated sample data inside the workspace."""
    cfg = _config(workspace)
    started = time.perf_counter()
    console.rule("1/6 generate sample data")
    generate(out=cfg.sample_dir, users=users, items=items, days=days, seed=seed, fmt="csv", locale=locale)
    console.rule("2/6 validate and ingest")
    validate(source=str(cfg.sample_dir), workspace=workspace, profile=None, strict=True, docs=True)
    ingest(source=str(cfg.sample_dir), workspace=workspace, profile=None, strict=True, as_json=False)
    console.rule("3/6 features: apply, build, materialize")
    features_apply(workspace=workspace, profile=None)
    features_build(workspace=workspace, profile=None, check=True)
    features_materialize(workspace=workspace, profile=None, full=False)
    console.rule("4/6 train and evaluate against the baselines, save to the BentoML store")
    # The global split only, and the evaluated model saved without a refit: within minutes on two cores.
    train_cmd(workspace=workspace, profile=None, epochs=40, batch_size=256, finetune_layers=None,
              max_positives=100_000, bert=None, device="auto", splits="global", baselines=True, refit=False,
              resume=False)
    console.rule("5/6 status")
    status(workspace=workspace, profile=None, as_json=False)
    console.rule("6/6 build the bento")
    build_bento(workspace=workspace, profile=None)
    console.print(f"[bold green]quickstart done[/] in {time.perf_counter() - started:.0f} s. "
                  f"Workspace: {workspace}", highlight=False)
