"""The per-target-behaviour protocol on a contract-shaped log: the id baselines `persona evaluate
--target` reports, as one markdown table, with the run's time and peak memory.

    .venv/bin/python benchmarks/eval_target.py ../shared/data/tmall-2014 --target purchase
    .venv/bin/python benchmarks/eval_target.py ../shared/data/amazon-office --target purchase
    .venv/bin/python benchmarks/eval_target.py --synthetic   # 55k items, 84k events: memory stays bounded
    .venv/bin/python benchmarks/eval_target.py ../shared/data/tmall-2014 --ranker   # + recall and rank

With ``--ranker`` the table comes from ``training.workflow.run`` (no feature store: the profile model's
towers are left out), with Persona's recall + rank, its feature-group ablation, and the report's
recall per source.

The rows are those of ``training.workflow.baseline_scorers`` (popularity by target counts, the
user's recent behaviour list, ItemKNN, EASE over the positives, EASE over all behaviour), each EASE's
λ chosen on the split's validation requests. Peak memory is ``resource.getrusage``'s maximum
resident set of this process.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np
import pandas as pd

from eventlog.sources import load_batch
from training.baselines import EASE_MAX_ITEMS, KNN_FULL_ITEMS, KNN_NEIGHBOURS
from training.evaluate import CHUNK_CELLS, evaluate_scorers
from training.workflow import RunConfig, baseline_scorers, make_split, run

ROWS = ("popularity", "recent", "cooccurrence", "ease", "ease-all")
COLUMNS = ["model", "requests", "NDCG@10", "Recall@10", "Recall@50", "MRR@10", "coverage"]


def peak_gb() -> float:
    """Peak resident memory of this process so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def load_folder(folder: Path) -> tuple[pd.DataFrame, list[str]]:
    """Events and the catalogue of a contract folder (csv or parquet), read as `persona ingest` reads it."""
    tables = load_batch(folder).tables
    events = tables["events"].frame
    items = tables["items"].frame["item_id"] if "items" in tables else events["item_id"].dropna().unique()
    return events, sorted(pd.Series(items).astype(str).unique())


def synthetic(n_items: int = 55_000, n_events: int = 84_000, n_users: int = 12_000,
              seed: int = 0) -> tuple[pd.DataFrame, list[str]]:
    """A shop log at that scale: Zipf item popularity, tastes in item clusters, views that lead to
    purchases, favourites and carts, times to the second over 90 days."""
    rng = np.random.default_rng(seed)
    clusters = 500
    taste = rng.integers(clusters, size=n_users)
    users = rng.integers(n_users, size=n_events)
    popular = rng.zipf(1.3, size=n_events) % n_items
    in_taste = taste[users] * (n_items // clusters) + rng.integers(n_items // clusters, size=n_events)
    items = np.where(rng.random(n_events) < 0.6, in_taste, popular)
    kind = rng.choice(["view", "purchase", "favorite", "add_to_cart"], size=n_events, p=[0.8, 0.12, 0.05, 0.03])
    seconds = rng.integers(90 * 86_400, size=n_events)
    events = pd.DataFrame({
        "event_id": [f"s{k}" for k in range(n_events)], "user_id": [f"u{u}" for u in users],
        "item_id": [f"i{i}" for i in items], "event_type": kind,
        "event_timestamp": pd.Timestamp("2024-01-01", tz="UTC") + pd.to_timedelta(seconds, unit="s")})
    return events, [f"i{i}" for i in range(n_items)]


def evaluate(events: pd.DataFrame, item_ids: list[str], target: str, positives: dict[str, float]) -> tuple:
    """The split, the baselines fitted and tuned on it, their metrics (overall), and the seconds and
    peak memory after fitting and after evaluating."""
    cfg = RunConfig(models=ROWS, target=target)
    started = time.perf_counter()
    split = make_split("target", events, positives, cfg)
    scorers = baseline_scorers(split, events, positives, item_ids, cfg, progress=False)
    fitted, fit_peak = time.perf_counter(), peak_gb()
    metrics = evaluate_scorers(scorers, split, events, positives, item_ids)
    return split, metrics[metrics["segment"] == "all"], (fitted - started, fit_peak), (time.perf_counter() - fitted,
                                                                                       peak_gb())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", type=Path, help="a contract folder (users/items/events)")
    parser.add_argument("--target", default="purchase", help="the event type to hold out")
    parser.add_argument("--positives", default=None,
                        help="comma-separated positive types for ItemKNN and EASE (default: the target)")
    parser.add_argument("--synthetic", action="store_true", help="a generated log instead of a folder")
    parser.add_argument("--ranker", action="store_true", help="add recall + rank (through training.workflow.run)")
    parser.add_argument("--report", type=Path, default=Path("benchmarks/results/eval_target"),
                        help="where --ranker writes its report")
    parser.add_argument("--items", type=int, default=55_000)
    parser.add_argument("--events", type=int, default=84_000)
    args = parser.parse_args()
    if args.synthetic:
        events, item_ids = synthetic(args.items, args.events)
        name = f"synthetic ({args.items:,} items, {args.events:,} events)"
    elif args.folder:
        events, item_ids = load_folder(args.folder)
        name = args.folder.name
    else:
        parser.error("give a folder or --synthetic")
    positives = {t: 1.0 for t in (args.positives.split(",") if args.positives else [args.target])}
    loaded = peak_gb()
    if args.ranker:
        items = load_batch(args.folder).tables["items"].frame if args.folder else pd.DataFrame({"item_id": item_ids})
        with_ranker(events, items, args.target, positives, args.report, name)
        return
    split, table, (fit_s, fit_gb), (eval_s, eval_gb) = evaluate(events, item_ids, args.target, positives)
    print(f"## {name}: {split.name}, {len(events):,} events, {len(item_ids):,} items\n")
    print(f"{len(split.requests):,} held-out {args.target} items of {split.requests['user_id'].nunique():,} "
          f"users; excluded: items with {', '.join(split.excluded_types)} before; positives for ItemKNN and "
          f"EASE: {', '.join(positives)}. EASE models at most {EASE_MAX_ITEMS:,} items; ItemKNN keeps "
          f"{'every neighbour' if len(item_ids) <= KNN_FULL_ITEMS else f'{KNN_NEIGHBOURS} neighbours'}.\n")
    print(table[COLUMNS].to_markdown(index=False, floatfmt=".4f"))
    print(f"\npeak memory (resident): {loaded:.2f} GB after loading the log, {fit_gb:.2f} GB after fitting and "
          f"tuning ({fit_s:.0f} s), {eval_gb:.2f} GB after evaluating ({eval_s:.0f} s, requests in chunks of "
          f"{min(2048, CHUNK_CELLS // len(item_ids)):,} x {len(item_ids):,} items)")


def with_ranker(events: pd.DataFrame, items: pd.DataFrame, target: str, positives: dict[str, float],
                report: Path, name: str) -> None:
    """The baselines and recall + rank with its ablation, as ``persona evaluate --target`` runs them."""
    cfg = RunConfig(models=(*ROWS, "recall-rank", "rank-ablation"), target=target, refit=False)
    started = time.perf_counter()
    result = run(None, events, items, positives, cfg, report, progress=False)
    overall = result["metrics"][result["metrics"]["segment"] == "all"]
    print(f"## {name}: recall + rank, target {target}\n")
    print(overall[COLUMNS].to_markdown(index=False, floatfmt=".4f"))
    print(f"\n{time.perf_counter() - started:.0f} s, peak memory {peak_gb():.2f} GB; report: {report / 'report.md'}")


if __name__ == "__main__":
    main()
