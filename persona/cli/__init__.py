"""The ``persona`` command line: one workspace per dataset, one command per pipeline stage.

One module per command group. Importing them registers their commands on `app`, and `persona --help`
lists the commands in that order, so the imports below keep it (isort is told to leave them)."""

from __future__ import annotations

import logging

# isort: off
from persona.cli.common import app
from persona.cli.data import generate, ingest, quarantine_list, quarantine_replay, status, suites_write, validate
from persona.cli.models import evaluate_cmd, recommend_cmd, train_cmd
from persona.cli.serving import build_bento, serve
from persona.cli.quickstart_cmd import quickstart
from persona.cli.privacy_cmds import export, forget
from persona.cli.features import features_apply, features_build, features_materialize
# isort: on

__all__ = ["app", "build_bento", "evaluate_cmd", "export", "features_apply", "features_build", "features_materialize",
           "forget", "generate", "ingest", "main", "quarantine_list", "quarantine_replay", "quickstart",
           "recommend_cmd", "serve", "status", "suites_write", "train_cmd", "validate"]


def main() -> None:  # pragma: no cover - console entry point
    logging.basicConfig(level=logging.WARNING)
    app()
