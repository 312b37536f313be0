"""The GPU path of `persona train`, run on a machine that has CUDA but not Persona's stores.

The lent GPU machine has PyTorch and transformers but no Feast, DuckDB or BentoML, and a call to
it carries at most 64 MiB. So the check runs in two steps:

``record`` (here, on a built workspace)::

    PYTHONPATH=. python benchmarks/gpu_check.py record WORKSPACE FOLDER

runs the default training protocol once, one short epoch, against the workspace's real Feast
store, and keeps every answer Feast gave (Parquet, zstd; without the ODFVs' state columns, which
the training code drops on arrival), the event log's tables, the positive weights and MiniLM's
weights (as float16: the float32 file alone is 87 MiB). Which rows the protocol fetches does not
depend on the epochs, the device or the trained models.

``replay`` (there)::

    PYTHONPATH=. python benchmarks/gpu_check.py replay FOLDER OUT [--epochs N] [--models persona,...] [--bert PATH]

runs the default ``persona train`` (evaluation run with every default baseline, then the
refit) with device "auto" on those answers, then loads the saved model on the CPU and on the
device and compares their vectors. It writes OUT/gpu_check.json and the report's files.
An entity frame that matches no recorded answer is an error, never a silent substitute.
``--epochs``, ``--models`` and ``--bert`` (the packaged float32 MiniLM, say) are for checking the
replay against the recording run here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

from core.contract import is_null
from training.dataset import STATE_COLUMNS
from training.model import ModelConfig, ProfileModel, default_bert_path
from training.train import TrainConfig, pick_device
from training.workflow import DEFAULT_MODELS, RunConfig, refit, run

PARQUET = {"compression": "zstd", "compression_level": 19}  # a device call carries 64 MiB at most


def entity_key(service: str, entity: pd.DataFrame) -> str:
    """A digest of an entity frame's values, column by column, that reads the same under any pandas."""
    digest = hashlib.sha256(service.encode())
    for col in sorted(entity.columns):
        values = [None if is_null(v) else v.isoformat() if hasattr(v, "isoformat") else str(v)
                  for v in entity[col].tolist()]
        digest.update(json.dumps([col, values]).encode())
    return digest.hexdigest()


class Answer:
    """What ``get_historical_features`` returns, as far as the training code reads it."""

    def __init__(self, frame: pd.DataFrame):
        self.frame = frame

    def to_df(self) -> pd.DataFrame:
        return self.frame.copy()


class RecordingStore:
    """A Feast store that keeps every offline answer and feature service it gives."""

    def __init__(self, store, folder: Path):
        self.store, self.folder = store, folder
        self.services: dict[str, list[list[str]]] = {}
        self.calls: list[dict] = []
        (folder / "answers").mkdir(parents=True, exist_ok=True)

    def get_feature_service(self, name: str):
        service = self.store.get_feature_service(name)
        self.services[name] = [[f.name for f in proj.features] for proj in service.feature_view_projections]
        return service

    def get_historical_features(self, entity_df: pd.DataFrame, features):
        frame = self.store.get_historical_features(entity_df=entity_df, features=features).to_df()
        name = f"answers/{len(self.calls):04d}.parquet"
        frame.drop(columns=[c for c in STATE_COLUMNS if c in frame]).to_parquet(self.folder / name, **PARQUET)
        key = entity_key(features.name, entity_df)
        self.calls.append({"service": features.name, "rows": len(entity_df), "key": key, "file": name})
        return Answer(frame)

    def save_index(self) -> None:
        (self.folder / "index.json").write_text(json.dumps({"services": self.services, "calls": self.calls}))


class ReplayStore:
    """Gives back the recorded answers, each to the entity frame it was recorded for."""

    def __init__(self, folder: Path):
        index = json.loads((folder / "index.json").read_text())
        self.folder, self.services = folder, index["services"]
        self.calls = {call["key"]: call for call in index["calls"]}
        self.replayed = 0

    def get_feature_service(self, name: str):
        views = [SimpleNamespace(features=[SimpleNamespace(name=n) for n in names]) for names in self.services[name]]
        return SimpleNamespace(name=name, feature_view_projections=views)

    def get_historical_features(self, entity_df: pd.DataFrame, features):
        call = self.calls.get(entity_key(features.name, entity_df))
        if call is None:
            raise LookupError(f"no recorded answer for {len(entity_df)} entity rows of {features.name}: "
                              "record again with this code")
        self.replayed += 1
        return Answer(pd.read_parquet(self.folder / call["file"]))


def record(workspace: Path, folder: Path) -> None:
    """Run the protocol's reads against the workspace's Feast store and keep everything replay needs."""
    from persona.cli.common import _config
    from persona.cli.models import _training_inputs

    cfg = _config(workspace)
    store, events, items = _training_inputs(cfg)
    recorder = RecordingStore(store, folder)
    # One epoch of Persona alone: the fetched rows are the same for every model and any epochs.
    run_cfg = RunConfig(train=TrainConfig(epochs=1, max_seconds=30), models=("persona",))
    result = run(recorder, events, items, cfg.positives, run_cfg, Path(tempfile.mkdtemp(prefix="gpu-record-")))
    refit(recorder, result["frame"], result["spec"], run_cfg, 1, item_ids=result["item_ids"], start=result["model"])
    recorder.save_index()
    events.to_parquet(folder / "events.parquet", **PARQUET)
    items.to_parquet(folder / "items.parquet", **PARQUET)
    (folder / "positives.json").write_text(json.dumps(cfg.positives))
    pack_bert(Path(default_bert_path()), folder / "bert")
    print(f"recorded {len(recorder.calls)} Feast answers in {folder}")


PACKED_WEIGHTS = "model.fp16.safetensors"


def pack_bert(source: Path, target: Path) -> None:
    """MiniLM's folder with its weights stored as float16 (replay loads them back as float32)."""
    import torch

    _copy_bert(source, target, ("model.safetensors", PACKED_WEIGHTS), torch.float16,
               keep=lambda f: f.suffix in (".json", ".txt") and f.name != "data_config.json")


def unpack_bert(packed: Path, target: Path) -> Path:
    import torch

    _copy_bert(packed, target, (PACKED_WEIGHTS, "model.safetensors"), torch.float32, keep=lambda f: True)
    return target


def _copy_bert(source: Path, target: Path, weights: tuple[str, str], dtype, keep) -> None:
    """``source``'s files that ``keep`` picks, and its weights file (``weights``: from, to) cast to ``dtype``."""
    from safetensors.torch import load_file, save_file

    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and path.name != weights[0] and keep(path):
            (target / path.name).write_bytes(path.read_bytes())
    tensors = load_file(source / weights[0])
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}, target / weights[1])


def replay(folder: Path, out: Path, epochs: int | None = None, models: tuple[str, ...] = DEFAULT_MODELS,
           bert: Path | None = None) -> dict:
    """The default `persona train` on the recorded answers, on whatever device "auto" picks."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    store = ReplayStore(folder)
    events, items = pd.read_parquet(folder / "events.parquet"), pd.read_parquet(folder / "items.parquet")
    positives = json.loads((folder / "positives.json").read_text())
    bert = bert or unpack_bert(folder / "bert", scratch / "bert")
    train_cfg = TrainConfig() if epochs is None else TrainConfig(epochs=epochs)
    run_cfg = RunConfig(model=ModelConfig(bert_path=str(bert)), train=train_cfg, models=models)
    device = pick_device(run_cfg.train.device)
    facts = {"when": datetime.now(UTC).isoformat(timespec="seconds"), "device": str(device),
             "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
             "torch": torch.__version__, "pandas": pd.__version__, "numpy": np.__version__}
    import transformers

    facts["transformers"] = transformers.__version__
    print(json.dumps(facts), flush=True)

    started = time.perf_counter()
    result = run(store, events, items, positives, run_cfg, out / "report")
    facts["run_s"] = round(time.perf_counter() - started, 1)
    facts["stages_s"] = {k: round(v, 1) for k, v in result["stages"].items()}
    evaluated = result["model"]
    facts["finetune_layers"] = evaluated.cfg.finetune_layers
    facts["model_device"] = str(evaluated.device)
    facts["amp"] = run_cfg.train.amp and device.type == "cuda"
    facts["best_epochs"] = result["best_epochs"]
    facts["histories"] = result["histories"]
    overall = result["metrics"][result["metrics"]["segment"] == "all"]
    facts["ndcg10"] = dict(zip(overall["model"], overall["NDCG@10"].round(4), strict=True))
    print(json.dumps({"run_s": facts["run_s"], "ndcg10": facts["ndcg10"]}), flush=True)

    started = time.perf_counter()
    model = refit(store, result["frame"], result["spec"], run_cfg, result["best_epochs"].get("Persona", 1),
                  item_ids=result["item_ids"], start=evaluated)
    facts["refit_s"] = round(time.perf_counter() - started, 1)
    facts["total_s"] = round(facts["run_s"] + facts["refit_s"], 1)
    facts["replayed_answers"] = store.replayed
    facts["serving"] = serving_check(model, result["frame"], scratch / "model", str(device))
    facts["config"] = {"model": asdict(run_cfg.model), "train": {k: v for k, v in asdict(run_cfg.train).items()
                                                                 if k != "history"}}
    (out / "gpu_check.json").write_text(json.dumps(facts, indent=2, default=str))
    print(json.dumps({k: v for k, v in facts.items() if k not in ("histories", "config")}, default=str), flush=True)
    return facts


def serving_check(model: ProfileModel, frame: pd.DataFrame, folder: Path, device: str) -> dict:
    """The saved model, loaded as the service loads it on the CPU and on ``device``: the same vectors."""
    import torch

    model.save(folder)
    rows = frame[frame["label"] == 1].tail(256)  # users and their items, with point-in-time features
    out, vectors = {}, {}
    for where in sorted({"cpu", device}):
        served = ProfileModel.load(folder, where)
        with torch.no_grad():
            started = time.perf_counter()
            users = served.user_vectors(rows).float().cpu()
            out[f"user_vectors_{where}_ms"] = round((time.perf_counter() - started) * 1000, 1)
            vectors[where] = (users, served.item_vectors(rows).float().cpu())
        out[f"loaded_on_{where}"] = str(served.device)
    if device != "cpu":
        (u_cpu, i_cpu), (u_dev, i_dev) = vectors["cpu"], vectors[device]
        out["user_max_abs_diff"] = float((u_cpu - u_dev).abs().max())
        out["item_max_abs_diff"] = float((i_cpu - i_dev).abs().max())
        top_cpu = (u_cpu @ i_cpu.T).argmax(dim=1)
        out["same_top_item_share"] = float(((u_dev @ i_dev.T).argmax(dim=1) == top_cpu).float().mean())
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["record", "replay"])
    parser.add_argument("source", type=Path, help="record: the workspace; replay: the recorded folder")
    parser.add_argument("target", type=Path, help="record: the folder to fill; replay: where results go")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--bert", type=Path)
    args = parser.parse_args(argv)
    if args.step == "record":
        record(args.source, args.target)
    else:
        replay(args.source, args.target, args.epochs, tuple(args.models.split(",")), args.bert)


if __name__ == "__main__":
    main(sys.argv[1:])
