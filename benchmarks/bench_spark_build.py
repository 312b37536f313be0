"""The spark profile's feature build at two log sizes: time, and the peak memory of each process.

    cd benchmarks && ../.venv/bin/python bench_spark_build.py            # 1M and 10M events
    cd benchmarks && ../.venv/bin/python bench_spark_build.py 1000000 3000000

For each size: a generated shop (``persona generate``'s simulation, a user per 65 events, 10,000
items, 30 days) is written straight into a SQLite event log (no gate: ingest is timed elsewhere),
then ``persona features apply`` and ``persona features build --profile spark`` run as they would for
a shop (checks included), with Spark on ``local[2]``. While the build runs, its process tree is
sampled every 0.2 s: the Python driver (what used to hold the log as one frame), the JVM (driver and,
in local mode, the executors: its heap is capped by ``PERSONA_SPARK_DRIVER_MEMORY``), and the Python
workers that fold the partitions. Writes benchmarks/spark_build_results.json.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil
from bench_common import load_log, write_results

from persona import sample_data

BIN = Path(sys.executable).parent
EVENTS_PER_USER = 65  # the generator's rate at 30 days and 10,000 items (its funnel: impressions, views, ...)


def _sample(proc: psutil.Process, peaks: dict[str, int]) -> None:
    """One sample of the tree's resident memory, by role, kept where it is a new peak."""
    try:
        tree = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    now = {"python_driver": 0, "jvm": 0, "python_workers": 0}
    for p in tree:
        try:
            rss, name = p.memory_info().rss, p.name()
        except psutil.NoSuchProcess:
            continue
        role = "python_driver" if p.pid == proc.pid else "jvm" if name == "java" else "python_workers"
        now[role] += rss
    for role, rss in now.items():
        peaks[role] = max(peaks.get(role, 0), rss)


def timed(args: list[str], env: dict) -> tuple[dict, str]:
    """One `persona` command: its wall time and the peak memory of its process tree by role, and its output.

    The output goes to a file, not a pipe: a command that writes more than a pipe holds (progress bars
    over a long run) would block on a pipe nobody reads until it ends."""
    with tempfile.TemporaryFile(mode="w+") as out:
        proc = psutil.Popen([str(BIN / "persona"), *args], env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        peaks: dict[str, int] = {}
        started = time.perf_counter()
        while proc.poll() is None:
            _sample(proc, peaks)
            time.sleep(0.2)
        seconds = time.perf_counter() - started
        out.seek(0)
        output = out.read()
    if proc.returncode:
        raise RuntimeError(output[-3000:])
    return {"seconds": round(seconds, 1), "peak_rss_mb": {k: round(v / 2**20) for k, v in peaks.items()}}, output


def timed_build(ws: Path, env: dict) -> dict:
    result, output = timed(["features", "build", "-w", str(ws), "--profile", "spark"], env)
    rows = [line.split(":") for line in output.splitlines() if line.strip().endswith(" rows") and ":" in line]
    return {**result, "rows": {name.strip(): int(n.split()[0].replace(",", "")) for name, n in rows}}


def over_sizes(run, sizes: list[int]) -> dict:
    """``run(n_events, folder)`` for each size, in one temporary folder, with the machine's particulars."""
    results: dict = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
                     "spark_master": os.environ.get("PERSONA_SPARK_MASTER", "local[2]"), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            results["runs"].append(run(n, Path(tmp)))
    return results


def run(n_events: int, root: Path) -> dict:
    users = max(100, round(n_events / EVENTS_PER_USER))
    started = time.perf_counter()
    shop = sample_data.generate(users, 10_000, 30, seed=0)
    ws = root / f"ws_{n_events}"
    load_log(ws, shop).dispose()
    events = len(shop["events"])
    del shop
    prepared = time.perf_counter() - started
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "HF_HUB_OFFLINE": "1", "BENTOML_DO_NOT_TRACK": "true"}
    subprocess.run([str(BIN / "persona"), "features", "apply", "-w", str(ws), "--profile", "spark"], env=env,
                   check=True, stdout=subprocess.DEVNULL)
    result = {"events": events, "users": users, "prepare_seconds": round(prepared, 1), **timed_build(ws, env)}
    print(f"{events:,} events:", result, flush=True)
    return result


def main() -> None:
    results = over_sizes(run, [int(a) for a in sys.argv[1:]] or [1_000_000, 10_000_000])
    if len(results["runs"]) > 1:
        small, large = results["runs"][0], results["runs"][-1]
        results["ratios_largest_to_smallest"] = {
            "events": round(large["events"] / small["events"], 2),
            "seconds": round(large["seconds"] / small["seconds"], 2),
            **{f"peak_rss_{k}": round(large["peak_rss_mb"][k] / max(small["peak_rss_mb"][k], 1), 2)
               for k in small["peak_rss_mb"]}}
    write_results("spark_build", results)


if __name__ == "__main__":
    main()
