"""`persona serve` stops cleanly on a SIGTERM sent to its own process id alone (as a supervisor sends
it): BentoML and every worker under it exit, and the port is free again within a few seconds."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from test_service import featured_workspace, service_env  # the service tests' helpers

BIN = Path(sys.executable).parent
STOP_SECONDS = 10


@pytest.fixture(scope="module")
def small_ws(tmp_path_factory, shop, tiny_bert) -> Path:
    """The small shared shop, with features and a one-epoch model on the tiny BERT."""
    ws = featured_workspace(tmp_path_factory.mktemp("serve_signal"), shop)
    subprocess.run([str(BIN / "persona"), "train", "-w", str(ws), "--bert", tiny_bert, "--epochs", "1",
                    "--max-positives", "100", "--splits", "global", "--no-baselines", "--no-refit"],
                   env=service_env(ws), check=True, capture_output=True, timeout=600)
    return ws


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _wait_ready(proc: subprocess.Popen, url: str, log_path: Path) -> None:
    for _ in range(180):
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(1)
    pytest.fail("persona serve did not become ready: " + log_path.read_text()[-3000:])


def _survivors(procs: list[psutil.Process], seconds: float) -> list[psutil.Process]:
    """The processes still running after ``seconds`` (zombies count as gone)."""
    _, alive = psutil.wait_procs(procs, timeout=seconds)
    return [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_sigterm_to_the_serve_pid_stops_bentoml_and_frees_the_port(small_ws, tmp_path):
    port = _free_port()
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log_file:
        # Its own session, so that whatever the SIGTERM leaves behind can be cleaned up here, and so that
        # the signal below reaches the serve process alone, never a group.
        proc = subprocess.Popen([str(BIN / "persona"), "serve", "--workspace", str(small_ws), "--host", "127.0.0.1",
                                 "--port", str(port)], env=service_env(small_ws), cwd=Path(__file__).parents[1],
                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_ready(proc, f"http://127.0.0.1:{port}", log_path)
            tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            assert len(tree) > 1, "expected BentoML's workers under persona serve"
            started = time.monotonic()
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=STOP_SECONDS)
            left = _survivors(tree, max(0.1, STOP_SECONDS - (time.monotonic() - started)))
            assert not left, f"still running after SIGTERM: {[(p.pid, p.name()) for p in left]}"
            while not _port_is_free(port) and time.monotonic() - started < STOP_SECONDS:
                time.sleep(0.1)
            assert _port_is_free(port), f"port {port} still taken {STOP_SECONDS} s after SIGTERM"
        finally:
            _kill_session(proc)


def _kill_session(proc: subprocess.Popen) -> None:
    """Whatever is left of the server's session (after a failure) is killed."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
