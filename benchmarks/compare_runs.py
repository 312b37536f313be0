"""Two benchmark runs side by side: every number in both runs' *_results.json, with after ÷ before.

    python benchmarks/compare_runs.py BEFORE_DIR AFTER_DIR [--match PATTERN]

Both folders come from ``benchmarks/run_small.sh`` (or copies of ``benchmarks/*_results.json``).
Timings on a shared 2-vCPU machine are noisy: read ratios within about ±20 % as the same.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def numbers(value, prefix: str = ""):
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from numbers(inner, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield prefix, float(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--match", default=r"seconds|_ms|p50|p99|per_second|rss|overhead",
                        help="regular expression the figure's name must match")
    args = parser.parse_args()
    wanted = re.compile(args.match)
    print("| figure | before | after | after ÷ before |\n|---|---|---|---|")
    for path in sorted(args.before.glob("*_results.json")):
        other = args.after / path.name
        if not other.exists():
            print(f"| {path.stem}: not in the after run | | | |")
            continue
        after = dict(numbers(json.loads(other.read_text())))
        for name, value in numbers(json.loads(path.read_text())):
            if wanted.search(name) and name in after:
                ratio = f"{after[name] / value:.2f}" if value else "—"
                print(f"| {path.stem.removesuffix('_results')}: {name} | {value:g} | {after[name]:g} | {ratio} |")
    for path in sorted(args.after.glob("*_results.json")):
        if not (args.before / path.name).exists():
            print(f"| {path.stem}: only in the after run | | | |")


if __name__ == "__main__":
    main()
