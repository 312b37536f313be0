"""Serving: run the API with `bentoml serve`, or build a bento."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from persona.cli.common import DEFAULT_WS, Profile, Workspace, _config, _fail, app, console

REPO_ROOT = Path(__file__).resolve().parents[2]  # the repository: bentofile.yaml paths are relative to it


def _service_env(cfg) -> dict:
    from training.model_store import bentoml_home

    bentoml_home(cfg.workspace)
    return {**os.environ, "PERSONA_WORKSPACE": str(cfg.workspace.resolve()), "BENTOML_DO_NOT_TRACK": "true",
            "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}


@app.command()
def serve(workspace: Workspace = DEFAULT_WS, profile: Profile = None,
          port: Annotated[int, typer.Option(min=1, max=65535)] = 3000, host: str = "127.0.0.1") -> None:
    """Serve /rank, /profile and /events for the workspace with `bentoml serve`.

    The command becomes `bentoml serve` (exec, same process id), so a supervisor's SIGTERM reaches
    BentoML itself, which stops its workers and frees the port."""
    import sys

    cfg = _config(workspace, profile)
    bentoml = str(Path(sys.executable).parent / "bentoml")
    console.print(f"serving {cfg.workspace} on http://{host}:{port} (OpenAPI at /docs; "
                  f"profile explorer at http://{host}:{port}/ui)", highlight=False)
    sys.stdout.flush()
    sys.stderr.flush()
    os.chdir(REPO_ROOT)
    os.execve(bentoml, [bentoml, "serve", "bentos.service:Persona", "--host", host, "--port", str(port)],
              _service_env(cfg))


@app.command("build")
def build_bento(workspace: Workspace = DEFAULT_WS, profile: Profile = None) -> None:
    """Build a bento (offline: lock_packages false; GPU resources and a CUDA base image declared)."""
    import subprocess
    import sys

    cfg = _config(workspace, profile)
    bentoml = str(Path(sys.executable).parent / "bentoml")
    result = subprocess.run([bentoml, "build", "-f", "bentos/bentofile.yaml", "."], cwd=REPO_ROOT,
                            env=_service_env(cfg), capture_output=True, text=True)
    if result.returncode != 0:
        _fail(f"bentoml build failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}", 1)
    tag = next((line.split('"')[1] for line in result.stdout.splitlines() if "Successfully built Bento" in line
                and '"' in line), None)
    console.print(f"built bento {tag or '(see bentoml list)'} in {os.environ['BENTOML_HOME']}\n"
                  f"serve it:  persona serve --workspace {workspace}\n"
                  f"call it:   curl -s -X POST http://127.0.0.1:3000/rank -H 'content-type: application/json' "
                  f"-d '{{\"user_id\": \"u000001\", \"k\": 5}}'", highlight=False)
