"""``persona train`` / ``evaluate`` / ``recommend``: dataset -> models and baselines on the same
split -> report -> refit on everything (the CLI then saves it with ``training.model_store``)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from core.config import DEFAULT_EXPOSURE_TYPES, DEFAULT_SEQUENCE_TYPES
from training import dataset
from training.baselines import (
    EASE_LAMBDAS,
    Histories,
    Scorer,
    Types,
    cooccurrence_scorer,
    ease_note,
    ease_scorer,
    item_types,
    popularity_scorer,
    recent_behaviour_scorer,
    sequential_scorer,
)
from training.encoding import FeatureSpec, item_text
from training.evaluate import (
    Split,
    evaluate_scorers,
    global_split,
    last_per_user_split,
    ndcg_at_10,
    rows_before,
    seen_before,
    target_split,
)
from training.model import Catalogue, ModelConfig, ProfileModel, in_batches, resolve_finetune
from training.recall.evaluation import ROW as RECALL_RANK
from training.recall.evaluation import recall_and_rank
from training.recall.fit import Behaviours
from training.recall.history import EventHistories
from training.recall.lexical import item_texts
from training.recall.package import TwoStage, stage_or_towers
from training.recall.two_stage import PER_SOURCE
from training.train import TrainConfig, pick_device, seed_everything, train

TEXT_COLUMNS = {"recent_queries", "recent_titles", "item_title", "item_description", "query", "last_search_query",
                "sequence_counts",
                "sequence_items", "sequence_types", "sequence_times"}
NOT_FEATURES = {"example_id", "user_id", "item_id", "event_timestamp", "request_timestamp", "label", "weight",
                "kind", "session", "device", "channel", "history_events", "cold", "event_id", "event_type",
                "signup_timestamp", "last_search_at"}


# The rows of the metrics table, by the key `--models` takes.
PERSONA = "Persona: BERT + MLP, ids, sequence"
MODEL_ROWS = {
    "persona": PERSONA,
    "mlp": "MLP tower, no text",
    "frozen": "frozen BERT, no training",
    "no-ids": "Persona without item ids",
    "no-sequence": "Persona without the sequence",
    "popularity": "popularity",
    "cooccurrence": "item co-occurrence",
    "ease": "EASE",
    "sequential": "sequential (SASRec-style, ids only)",
    "recent": "recent behaviour (own items, newest day first)",
    "ease-all": "EASE over all behaviour",
    "recall-rank": RECALL_RANK,
    "rank-ablation": f"{RECALL_RANK} without each feature group",  # one more ranker per group (in `all`)
}
# Rows of a per-target-behaviour run (``RunConfig.target``) only: one more EASE fit is not worth every
# default train's time. The recent list is cheap and, on shop logs, the baseline to beat: every split has it.
TARGET_ONLY = ("ease-all",)

DEFAULT_MODELS = ("persona", "recall-rank", "mlp", "frozen", "popularity", "cooccurrence", "ease", "sequential",
                  "recent", "ease-all")
OURS = ("persona", "recall-rank", "rank-ablation")  # rows that are Persona, not baselines
ABLATIONS = {"mlp": "text", "no-ids": "item ids", "no-sequence": "sequence"}  # row -> what it leaves out


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    neg_per_pos: int = 0  # sampled negatives per positive: the full softmax needs none (AUC uses exposures)
    baseline_seconds: float = 120.0  # budget of each trained baseline (the MLP-only tower)
    splits: tuple[str, ...] = ("loo",)
    baselines: bool = True
    refit: bool = True
    models: tuple[str, ...] = DEFAULT_MODELS  # which rows to train and report (keys of MODEL_ROWS)
    target: str | None = None  # an event type: evaluate on each user's last day of it (``target_split``)
    serve: str = "auto"  # what `persona train` saves for /rank: auto (the evaluation decides), recall-rank, towers
    sequence_types: tuple[str, ...] = DEFAULT_SEQUENCE_TYPES  # the workspace's (``Config.sequence_types``)
    exposure_types: tuple[str, ...] = DEFAULT_EXPOSURE_TYPES  # negatives in training (``Config.exposure_types``)

    def wants(self, key: str) -> bool:
        if key in TARGET_ONLY and self.target is None:
            return False
        return key in self.models and (key in OURS or self.baselines)

    @property
    def ranker_ablation(self) -> bool:
        """Recall + rank retrained without each feature group, to show what each adds."""
        return self.wants("rank-ablation")

    def split_names(self) -> tuple[str, ...]:
        """The splits to run: the per-target split alone when a target is set."""
        return ("target",) if self.target else self.splits


def make_split(name: str, events: pd.DataFrame, positives: dict[str, float], cfg: RunConfig) -> Split:
    """One split by its name: global, loo, or target (``cfg.target``'s last day per user)."""
    if name == "target":
        if not (events["event_type"] == cfg.target).any():
            raise ValueError(f"no event of type {cfg.target!r} in the log: nothing to hold out")
        return target_split(events, cfg.target)
    return global_split(events, positives) if name == "global" else last_per_user_split(events, positives)


class Stages:
    """Wall time of each stage of a run, printed as it ends (a user sees where the minutes go)."""

    def __init__(self, progress: bool = True):
        self.seconds: dict[str, float] = {}
        self.progress = progress

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
            if self.progress:
                from tqdm.auto import tqdm

                tqdm.write(f"{name}: {self.seconds[name]:.1f} s")


def feature_spec(store, frame: pd.DataFrame) -> FeatureSpec:
    """Split the services' features into numeric and categorical inputs by their dtypes."""
    user_cols = [c for c in dataset.service_features(store, dataset.USER_SERVICE)
                 if c in frame and c not in NOT_FEATURES]
    item_cols = [f"{dataset.ITEM_PREFIX}{c}" for c in dataset.service_features(store, dataset.ITEM_SERVICE)]
    item_cols = [c for c in item_cols if c in frame]

    def kinds(cols):
        num = [c for c in cols if c not in TEXT_COLUMNS and pd.api.types.is_numeric_dtype(frame[c])]
        cat = [c for c in cols if c not in TEXT_COLUMNS and c not in num and frame[c].notna().any()]
        return num, cat

    un, uc = kinds(user_cols)
    inum, icat = kinds(item_cols)
    return FeatureSpec.fit(frame, frame, un, uc, inum, icat, item_ids=frame.loc[frame["label"] == 1, "item_id"])


def user_features(store, requests: pd.DataFrame) -> pd.DataFrame:
    """Point-in-time user and context features for ranking requests."""
    entity = requests[["user_id", "event_timestamp", "device", "channel", "request_timestamp"]].copy()
    entity["example_id"] = np.arange(len(entity))
    entity["event_timestamp"] = dataset.micro(entity["event_timestamp"])
    entity["request_timestamp"] = dataset.micro(entity["request_timestamp"])
    for col in ("device", "channel"):
        values = entity[col].astype(object).where(entity[col].notna(), None)
        # a column of nothing but nulls has no type: Postgres' offline store cannot create its entity table
        entity[col] = values if values.notna().any() else pd.Series(pd.NA, index=entity.index, dtype="string")
    feats = dataset.historical_user_features(store, entity)
    return with_features(requests, feats.sort_values("example_id"))


def with_features(requests: pd.DataFrame, feats: pd.DataFrame) -> pd.DataFrame:
    """The requests beside their fetched features (``feats``: a row per request, in their order)."""
    feats = feats.reset_index(drop=True).drop(columns=[c for c in ("user_id", "event_timestamp", "device", "channel",
                                                                    "request_timestamp", "example_id") if c in feats])
    return pd.concat([requests.reset_index(drop=True), feats], axis=1)


class RequestFeatures:
    """Point-in-time user features of request frames, fetched through Feast once per distinct frame:
    every epoch's validation and every model's test pass read the same requests."""

    KEY = ["user_id", "event_timestamp", "device", "channel", "request_timestamp", "query"]

    def __init__(self, store):
        self.store = store
        self.cache: dict[bytes, pd.DataFrame] = {}

    def __call__(self, requests: pd.DataFrame) -> pd.DataFrame:
        key_cols = [c for c in self.KEY if c in requests]
        key = hashlib.sha256(pd.util.hash_pandas_object(requests[key_cols].astype(str), index=False)
                             .to_numpy().tobytes()).digest()
        if key not in self.cache:
            self.cache[key] = user_features(self.store, requests)
        frame = self.cache[key]
        return pd.concat([requests.reset_index(drop=True), frame.drop(columns=list(requests.columns), errors="ignore")],
                         axis=1)


def model_scorer(model: ProfileModel, features: Callable[[pd.DataFrame], pd.DataFrame],
                 catalogue: dataset.ItemCatalogue) -> Scorer:
    """Scores requests against the catalogue as of each request's own time (its as-of bucket);
    ``features`` gives their point-in-time user features (``RequestFeatures``)."""
    vectors = _catalogue_vectors(model, catalogue)

    @torch.no_grad()
    def score(requests: pd.DataFrame) -> np.ndarray:
        requests = requests.reset_index(drop=True)
        frame = features(requests)
        buckets = catalogue.bucket_of(requests["event_timestamp"])
        out = np.zeros((len(requests), len(catalogue.item_ids)), dtype=np.float32)
        for b in np.unique(buckets):
            rows = np.flatnonzero(buckets == b)
            out[rows] = tower_scores(model, frame.iloc[rows], vectors(int(b)))
        return out
    return score


@torch.no_grad()
def tower_scores(model: ProfileModel, frame: pd.DataFrame, items: Catalogue) -> np.ndarray:
    """Each row's score for every item: its user vector against the catalogue's vectors."""
    users = in_batches(lambda f: model.user_vectors(f, catalogue=items), frame)
    return model.score(users, items.vectors).float().cpu().numpy()


def _catalogue_vectors(model: ProfileModel, catalogue: dataset.ItemCatalogue):
    """Item vectors per as-of bucket, computed on first use."""
    index = {i: k for k, i in enumerate(catalogue.item_ids)}
    cache: dict[int, Catalogue] = {}

    @torch.no_grad()
    def vectors(bucket: int) -> Catalogue:
        if bucket not in cache:
            cache[bucket] = Catalogue(index, in_batches(model.item_vectors, catalogue.frames[bucket], 512))
        return cache[bucket]
    return vectors


def pair_scorer(model: ProfileModel, catalogue: dataset.ItemCatalogue):
    """Score of each labelled row's own item (for AUC); rows already carry their user features."""
    vectors = _catalogue_vectors(model, catalogue)

    @torch.no_grad()
    def score(frame: pd.DataFrame) -> np.ndarray:
        frame = frame.reset_index(drop=True)
        buckets = catalogue.bucket_of(frame["event_timestamp"])
        out = np.full(len(frame), np.nan, dtype=np.float32)
        for b in np.unique(buckets):
            rows = np.flatnonzero(buckets == b)
            items = vectors(int(b))
            users = in_batches(lambda f, items=items: model.user_vectors(f, catalogue=items), frame.iloc[rows])
            cols = frame["item_id"].iloc[rows].map(items.index)
            known = cols.notna().to_numpy(copy=True)  # writable: pandas 3's arrays are read-only views
            scores = model.score(users[known], items.vectors[cols[known].to_numpy(dtype=np.int64, copy=True)])
            out[rows[known]] = torch.diagonal(scores).float().cpu().numpy()
        return out
    return score


def frozen_text_scorer(model: ProfileModel, features: Callable[[pd.DataFrame], pd.DataFrame],
                       catalogue: dataset.ItemCatalogue) -> Scorer:
    """No training at all: cosine between frozen BERT's vector of the item text and the mean of the
    user's last engaged items' text vectors plus the live query's (a pure text baseline)."""
    item_vecs = {}

    def vectors(bucket: int) -> torch.Tensor:
        if bucket not in item_vecs:
            texts = item_text(catalogue.frames[bucket])
            item_vecs[bucket] = torch.nn.functional.normalize(model.encode_text(texts, model.cfg.item_max_len), dim=-1)
        return item_vecs[bucket]

    index = {i: k for k, i in enumerate(catalogue.item_ids)}

    @torch.no_grad()
    def score(requests: pd.DataFrame) -> np.ndarray:
        requests = requests.reset_index(drop=True)
        frame = features(requests)
        inputs = model.user_inputs(frame)
        buckets = catalogue.bucket_of(requests["event_timestamp"])
        out = np.zeros((len(requests), len(catalogue.item_ids)), dtype=np.float32)
        for r, history in enumerate(inputs.history):
            items = vectors(int(buckets[r]))
            rows = [index[i] for i in history[-10:] if i in index]
            user = items[rows].mean(0) if rows else torch.zeros(items.shape[1])
            if inputs.query is not None and inputs.has_text[r, 0]:
                user = user + torch.nn.functional.normalize(inputs.query[r], dim=-1)
            out[r] = (items @ user).numpy()
        return out
    return score


def _validation(features: RequestFeatures, split: Split, events: pd.DataFrame, positives: dict, item_ids: list[str],
                catalogue: dataset.ItemCatalogue):
    """NDCG@10 on the split's validation requests (before any test request): early stopping."""
    if split.validation.empty:
        return None

    def validate(model: ProfileModel) -> float:
        return ndcg_at_10(model_scorer(model, features, catalogue), split.validation, events,
                          split.exclusion(positives), item_ids)
    return validate


def baseline_scorers(split: Split, events: pd.DataFrame, positives: dict[str, float], item_ids: list[str],
                     cfg: RunConfig, progress: bool = True) -> dict[str, Scorer]:
    """The id-based baselines: hyper-parameters and early stopping on the validation requests only.

    With a target (``cfg.target``) popularity counts that type's events, and the rows include EASE over
    every behaviour type. Every split has the user's own recent behaviour list."""
    fit_events = split.before(events, split.fit_cut)
    train_events = split.before(events, split.test_cut)
    histories = Histories(events, positives, item_ids)  # each request's own history, shared by every scorer

    out: dict[str, Scorer] = {}

    def validated(scorer: Scorer) -> float:
        return ndcg_at_10(scorer, split.validation, events, split.exclusion(positives), item_ids)

    def tuned_ease(types: Types, name: str) -> None:
        hist = histories if types is positives else Histories(events, types, item_ids)
        lam = EASE_LAMBDAS[0]
        if len(split.validation):
            lam = max(EASE_LAMBDAS, key=lambda v: validated(ease_scorer(fit_events, types, item_ids, v, hist)))
        out[f"{name} (λ={lam:g}{ease_note(len(item_ids))})"] = ease_scorer(train_events, types, item_ids, lam, hist)

    if cfg.wants("popularity") and cfg.target:
        out[f"{MODEL_ROWS['popularity']} ({cfg.target} counts)"] = popularity_scorer(
            train_events, (cfg.target,), item_ids, count_events=True)
    elif cfg.wants("popularity"):
        out[MODEL_ROWS["popularity"]] = popularity_scorer(train_events, positives, item_ids)
    if cfg.wants("recent"):
        out[MODEL_ROWS["recent"]] = recent_behaviour_scorer(events, item_ids)
    if cfg.wants("cooccurrence"):
        out[MODEL_ROWS["cooccurrence"]] = cooccurrence_scorer(train_events, positives, item_ids, histories)
    if cfg.wants("ease"):
        tuned_ease(positives, MODEL_ROWS["ease"])
    if cfg.wants("ease-all"):
        tuned_ease(item_types(events), MODEL_ROWS["ease-all"])
    if cfg.wants("sequential"):
        out[MODEL_ROWS["sequential"]] = sequential_scorer(
            fit_events, positives, item_ids, histories, validated if len(split.validation) else None,
            progress=progress, device=pick_device(cfg.train.device))
    return out


def run(store, events: pd.DataFrame, items: pd.DataFrame, positives: dict[str, float], cfg: RunConfig,
        report_dir: Path, progress: bool = True) -> dict:
    """Train and evaluate the model and baselines on each split; returns metrics and artefacts.

    Per split, the model's statistics and vocabularies are fitted on its training rows only.
    """
    item_ids = items["item_id"].astype(str).tolist()
    model_cfg = resolve_finetune(cfg.model, pick_device(cfg.train.device), len(item_ids))
    variants = {MODEL_ROWS["persona"]: model_cfg, MODEL_ROWS["mlp"]: replace(model_cfg, use_text=False),
                MODEL_ROWS["no-ids"]: replace(model_cfg, use_ids=False),
                MODEL_ROWS["no-sequence"]: replace(model_cfg, use_sequence=False)}
    variants = {name: variants[name] for key, name in MODEL_ROWS.items() if name in variants and cfg.wants(key)}
    stage = Stages(progress)
    frame = None
    if variants or cfg.wants("frozen"):  # the id baselines read the event log only: no training set for them
        with stage("training set (examples and point-in-time features)"):
            examples = dataset.build_examples(events, items, positives, cfg.neg_per_pos, seed=cfg.train.seed,
                                              exposure_types=cfg.exposure_types)
            frame = dataset.fetch_features(store, examples)
    tables, histories, best_epochs, evaluated_model, extra, persona_model = [], {}, {}, None, [], None
    evaluated_cut = None  # the evaluated model learnt from the rows before it (a warm refit adds the rest)
    two_stage = None  # the first split's ranker and its layout: what `persona train` saves for serving
    served = None  # the row chosen for serving, on the first split
    for split_name in cfg.split_names():
        split = make_split(split_name, events, positives, cfg)
        with stage("id baselines (fit and tune)"):
            scorers = baseline_scorers(split, events, positives, item_ids, cfg, progress)
        pairs, test_rows = {}, None
        if variants or cfg.wants("frozen"):
            with stage("catalogue as of each request"):
                fit_frame = split.before(frame, split.fit_cut)
                spec = feature_spec(store, fit_frame)
                catalogue = dataset.ItemCatalogue(store, item_ids, pd.concat([split.requests["event_timestamp"],
                                                                              split.validation["event_timestamp"]]))
                features = RequestFeatures(store)  # one Feast fetch per request set, whatever the model
                validate = _validation(features, split, events, positives, item_ids, catalogue)
                labelled = frame["kind"].isin(["positive", "exposure"])
                test_rows = frame[labelled & ~frame.index.isin(split.before(frame, split.test_cut).index)].head(5000)
        if cfg.wants("frozen"):
            frozen = ProfileModel.build(replace(cfg.model, finetune_layers=0), spec)  # a baseline: BERT as shipped
            scorers[MODEL_ROWS["frozen"]] = frozen_text_scorer(frozen, features, catalogue)
        with stage("catalogue as of each training row"):
            train_catalogue = dataset.ItemCatalogue(store, item_ids, fit_frame["event_timestamp"]) if variants else None
        for name, mcfg in variants.items():
            tcfg = replace(cfg.train, checkpoint_dir=None, resume=False)
            if name == MODEL_ROWS["mlp"]:  # a baseline; the ablations get Persona's budget, to be fair
                tcfg.max_seconds = min(tcfg.max_seconds or cfg.baseline_seconds, cfg.baseline_seconds)
            with stage(f"train: {name}"):
                seed_everything(tcfg.seed)  # the same initial weights whatever ran before
                model = ProfileModel.build(mcfg, spec).to(pick_device(tcfg.device))
                history = train(model, fit_frame, train_catalogue, tcfg, validate, progress)
            histories[f"{split.name}: {name}"] = history
            if name == PERSONA and split_name == cfg.split_names()[0]:
                best = max(history, key=lambda h: h["val_ndcg10"] or 0.0) if history else {"epoch": 1}
                best_epochs["Persona"] = best["epoch"]
                evaluated_model, evaluated_cut = model, split.fit_cut
            scorers[name] = model_scorer(model, features, catalogue)
            pairs[name] = pair_scorer(model, catalogue)
            if name == PERSONA:
                persona_model = model
        if cfg.wants("recall-rank"):
            with stage("recall + rank: sources, ranker" + (" and its ablations" if cfg.ranker_ablation else "")):
                tower = tower_scorer(persona_model, features, store, item_ids) if PERSONA in variants else None
                rr = recall_and_rank(events, items, _behaviours(cfg, split, positives), split.fit_cut, split.test_cut,
                                     split.before, tower, item_texts(items), cfg.ranker_ablation,
                                     per_event=split_name != "target")  # requests shaped as the split's
                scorers.update(rr.scorers)
                extra += _recall_lines(split.name, rr, split.requests)
                candidate = (rr.ranker, rr.spec)
        with stage("evaluation on the test requests"):
            tables.append(evaluate_scorers(scorers, split, events, positives, item_ids, pairs, test_rows))
        if not served and cfg.wants("recall-rank"):
            served, verdict, scope = serving_choice(tables[-1], candidate, cfg.serve)
            two_stage = (candidate[0], replace(candidate[1], scope=scope)) if served == RECALL_RANK else None
            extra += [f"## What `persona train` serves ({split.name})", "", verdict, ""]
    metrics = pd.concat(tables, ignore_index=True)
    report = write_report(report_dir, metrics, histories, stage.seconds, extra)
    return {"metrics": metrics, "spec": feature_spec(store, frame) if frame is not None else None, "frame": frame,
            "item_ids": item_ids, "stages": stage.seconds,
            "best_epochs": best_epochs, "report": report, "histories": histories, "model": evaluated_model,
            "fit_cut": evaluated_cut, "two_stage": two_stage}


def serving_choice(metrics: pd.DataFrame, candidate, serve: str = "auto") -> tuple[str, str, str]:
    """Recall + rank serves only where it ranked better than the profile model alone on the split's
    test requests (NDCG@10): the evaluation decides what `/rank` runs, not the code path. Where it is
    better only on the requests with a search (``MIN_QUERY_REQUESTS`` of them at least), it serves those
    (scope "queries"). ``serve`` (`persona train --serve`) overrides it. Returns (row, verdict, scope)."""
    ndcg = metrics.set_index(["model", "segment"])["NDCG@10"]
    ours, towers = ndcg.get((RECALL_RANK, "all")), ndcg.get((PERSONA, "all"))
    if candidate is None or ours is None:
        return PERSONA, "Recall + rank was not trained: `/rank` ranks with the two towers.", "all"
    if serve == "towers":
        return PERSONA, f"`/rank` ranks with the two towers (`--serve towers`; recall + rank scored {ours:.4f}).", "all"
    if serve == "recall-rank":
        return RECALL_RANK, f"`/rank` runs recall + rank (`--serve recall-rank`): NDCG@10 {ours:.4f}.", "all"
    if towers is not None and not ours > towers:
        searched = _with_query(metrics)
        verdict = f"recall + rank scored NDCG@10 {ours:.4f}, not above the profile model's {towers:.4f}"
        if searched is not None and searched[0] > searched[1]:
            return RECALL_RANK, (f"`/rank` runs recall + rank for requests with a search and the two towers for the "
                                 f"rest: overall {verdict}, but on the {searched[2]} test requests with a search it "
                                 f"scored {searched[0]:.4f} against {searched[1]:.4f}."), "queries"
        return PERSONA, f"`/rank` ranks with the two towers: {verdict}, so its ranker is not saved with the model.", \
            "all"
    against = f", the profile model alone {towers:.4f}" if towers is not None else ""
    saved = "Its ranker is saved with the model."
    return RECALL_RANK, f"`/rank` runs recall + rank: NDCG@10 {ours:.4f}{against}. {saved}", "all"


MIN_QUERY_REQUESTS = 30  # fewer test requests with a search than this: too few to decide on them


def _with_query(metrics: pd.DataFrame) -> tuple[float, float, int] | None:
    """(recall + rank, towers, requests) on the test requests with a search, when there are enough."""
    rows = metrics[metrics["segment"] == "with query"].set_index("model")
    if RECALL_RANK not in rows.index or PERSONA not in rows.index or "requests" not in rows:
        return None
    n = int(rows.loc[RECALL_RANK, "requests"])
    if n < MIN_QUERY_REQUESTS:
        return None
    return float(rows.loc[RECALL_RANK, "NDCG@10"]), float(rows.loc[PERSONA, "NDCG@10"]), n


def _behaviours(cfg: RunConfig, split: Split, positives: dict[str, float]) -> Behaviours:
    """What recall + rank reads: the sequence types, the items left out (the split's rule) and the
    targets it learns (the split's target type, else every positive with its weight)."""
    targets = {cfg.target: 1.0} if cfg.target else dict(positives)
    return Behaviours(list(cfg.sequence_types), list(split.exclusion(positives)), targets)


TOWER_CACHE_BYTES = 1 << 30  # tower scores kept for re-use by the ranker's ablations


def tower_scorer(model: ProfileModel, features: Callable[[pd.DataFrame], pd.DataFrame], store,
                 item_ids: list[str]) -> Scorer:
    """The profile model's scores for any requests, the catalogue as of their own times, kept for the
    next caller with the same requests (each ablation scores the same test chunks)."""
    cache: dict[bytes, np.ndarray] = {}

    def score(requests: pd.DataFrame) -> np.ndarray:
        requests = requests.reset_index(drop=True)
        for col in ("device", "channel", "query"):
            if col not in requests:
                requests[col] = None
        if "request_timestamp" not in requests:
            requests["request_timestamp"] = requests["event_timestamp"]
        key = hashlib.sha256(pd.util.hash_pandas_object(requests[["user_id", "event_timestamp"]].astype(str),
                                                        index=False).to_numpy().tobytes()).digest()
        if key not in cache:
            catalogue = dataset.ItemCatalogue(store, item_ids, requests["event_timestamp"])
            out = model_scorer(model, features, catalogue)(requests)
            if sum(v.nbytes for v in cache.values()) + out.nbytes > TOWER_CACHE_BYTES:
                return out
            cache[key] = out
        return cache[key]
    return score


def _recall_lines(split_name: str, rr, requests: pd.DataFrame) -> list[str]:
    """The report's recall-per-source table and the ranker's feature-group ablation."""
    lines = [f"## Recall + rank: candidates per source ({split_name})", "",
             f"Share of the test targets each source proposes (its best {PER_SOURCE}), and their union: the "
             f"ranker can only place what recall found. The ranker learnt from {rr.lists:,} requests with a target "
             "among their candidates (target events between the fit and test cuts).", "",
             rr.recall_table(requests).to_markdown(index=False, floatfmt=".4f"), ""]
    return lines


REFIT_EPOCHS = 2  # a refit that starts from the evaluated model: its epochs over the new rows and a replay
REPLAY_PER_NEW_ROW = 1.0  # rows the evaluated model learnt from, drawn again per row it never saw


def refit_rows(frame: pd.DataFrame, fit_cut: pd.Timestamp | pd.Series | None, seed: int = 0) -> pd.DataFrame:
    """What a warm refit trains on: every row the evaluated model never saw (from its fit cut on),
    and as many of the rows it learnt from, drawn at random so that it does not drift towards the
    newest. Two passes over every row cost as much as the evaluation's own epochs (212 s of a 772 s
    `persona train` on a 100k-event log) to teach it a few rows per user. No cut: every row."""
    if fit_cut is None:
        return frame
    seen = rows_before(frame, fit_cut)
    new = frame.drop(seen.index)
    if new.empty:
        return frame
    replay = seen.sample(min(len(seen), int(round(len(new) * REPLAY_PER_NEW_ROW))), random_state=seed)
    return frame.loc[frame.index.isin(replay.index) | frame.index.isin(new.index)]


def refit(store, frame: pd.DataFrame, spec: FeatureSpec, cfg: RunConfig, epochs: int,
          progress: bool = True, item_ids: list[str] | None = None,
          start: ProfileModel | None = None, fit_cut: pd.Timestamp | pd.Series | None = None) -> ProfileModel:
    """Train the deployed model on every example up to the newest event (no hold-out).

    From scratch (``epochs`` epochs, the evaluated run's best), or, given ``start`` (the evaluated
    model), from its weights for ``REFIT_EPOCHS`` epochs at the learning rate after a plateau: it
    learns the held-out newest interactions at a fraction of the cost. Given the evaluated model's
    ``fit_cut`` too, the warm refit passes over the rows from that cut on and an equal random
    share of the earlier ones (``refit_rows``), not over every row. A warm start keeps the
    evaluated model's statistics and id vocabulary; items new since its cut rank by text and
    features (the id-dropout path) until the next full `persona train`.
    ``item_ids``: the catalogue to train against (default: every item the examples name).
    """
    item_ids = item_ids or sorted(set(spec.item_ids) | set(frame["item_id"].dropna().astype(str)))
    if start is not None:
        frame = refit_rows(frame, fit_cut, cfg.train.seed)
    catalogue = dataset.ItemCatalogue(store, item_ids, frame["event_timestamp"])
    if start is not None:
        tcfg = replace(cfg.train, epochs=REFIT_EPOCHS, patience=REFIT_EPOCHS + 1,
                       lr=cfg.train.lr * cfg.train.plateau_decay, bert_lr=cfg.train.bert_lr * cfg.train.plateau_decay)
        model = ProfileModel.build(start.cfg, start.spec).to(pick_device(tcfg.device))
        model.load_state_dict(start.state_dict())
        train(model, frame, catalogue, tcfg, None, progress)
        return model
    tcfg = replace(cfg.train, epochs=max(1, epochs), patience=epochs + 1)
    seed_everything(tcfg.seed)
    device = pick_device(tcfg.device)
    model = ProfileModel.build(resolve_finetune(cfg.model, device, len(item_ids)), spec).to(device)
    train(model, frame, catalogue, tcfg, None, progress)
    return model


def write_report(folder: Path, metrics: pd.DataFrame, histories: dict[str, list[dict]],
                 stages: dict[str, float] | None = None, extra: list[str] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    metrics.to_csv(folder / "metrics.csv", index=False)
    overall = metrics[metrics["segment"] == "all"]
    cols = [c for c in ("requests", "NDCG@10", "Recall@10", "Recall@50", "MRR@10", "coverage", "AUC") if c in metrics]
    md = [f"# Persona ranking report ({datetime.now(UTC):%Y-%m-%d %H:%M UTC})", "",
          "Full-catalogue ranking; items the user already engaged with are excluded. Same split for every row.", ""]
    for split, group in overall.groupby("split", sort=False):
        md += [f"## {split}", "", group[["model"] + cols].to_markdown(index=False, floatfmt=".4f"), ""]
        seg = metrics[(metrics["split"] == split) & (metrics["segment"] != "all")]
        md += ["Breakdown (NDCG@10):", "",
               seg.pivot_table(index="model", columns="segment", values="NDCG@10").to_markdown(floatfmt=".4f"), "",
               "Requests per segment:", "",
               seg[seg["model"] == seg["model"].iloc[0]].set_index("segment")[["requests"]].T.to_markdown(index=False),
               ""]
    md += _ablation(overall)
    md += _ranker_ablation(overall)
    md += extra or []
    if stages:
        md += ["## Where the time went", "", pd.DataFrame({"stage": list(stages), "seconds": list(stages.values())})
               .to_markdown(index=False, floatfmt=".1f"), ""]
    md += ["![metrics](metrics.png)", "", "![training curve](training_curve.png)", ""]
    (folder / "report.md").write_text("\n".join(md))
    fig, axes = plt.subplots(1, max(1, overall["split"].nunique()), figsize=(11, 4), squeeze=False)
    for ax, (split, group) in zip(axes[0], overall.groupby("split", sort=False), strict=False):
        ax.barh(group["model"], group["NDCG@10"], color="#4477aa")
        ax.set_title(f"NDCG@10 — {split}")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(folder / "metrics.png", dpi=110)
    plt.close(fig)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, hist in histories.items():
        if hist:
            ax1.plot([h["epoch"] for h in hist], [h["loss"] for h in hist], marker="o", label=name)
            ax2.plot([h["epoch"] for h in hist], [h["val_ndcg10"] if h["val_ndcg10"] is not None else np.nan
                                                  for h in hist], marker="o", label=name)
    ax1.set_title("training loss")
    ax2.set_title("validation NDCG@10")
    ax1.set_xlabel("epoch")
    ax2.set_xlabel("epoch")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "training_curve.png", dpi=110)
    plt.close(fig)
    return folder / "report.md"


def _ablation(overall: pd.DataFrame) -> list[str]:
    """Where the lift comes from: Persona against itself without one part at a time."""
    lines = []
    for split, group in overall.groupby("split", sort=False):
        ndcg = group.set_index("model")["NDCG@10"]
        if PERSONA not in ndcg:
            continue
        rows = [{"left out": part, "model": MODEL_ROWS[key], "NDCG@10": ndcg[MODEL_ROWS[key]],
                 "Persona's lift over it": ndcg[PERSONA] - ndcg[MODEL_ROWS[key]],
                 "share of Persona's NDCG@10": (ndcg[PERSONA] - ndcg[MODEL_ROWS[key]]) / ndcg[PERSONA]
                 if ndcg[PERSONA] else float("nan")}
                for key, part in ABLATIONS.items() if MODEL_ROWS[key] in ndcg]
        if rows:
            lines += [f"## Ablation ({split})", "", pd.DataFrame(rows).to_markdown(index=False, floatfmt=".4f"), ""]
    return lines


def _ranker_ablation(overall: pd.DataFrame) -> list[str]:
    """What each feature group adds to recall + rank: its NDCG@10 with the ranker retrained without it."""
    lines, prefix = [], f"{RECALL_RANK} without "
    for split, group in overall.groupby("split", sort=False):
        ndcg = group.set_index("model")["NDCG@10"]
        if RECALL_RANK not in ndcg:
            continue
        rows = [{"left out": name[len(prefix):], "NDCG@10": value, "lift of the full ranker": ndcg[RECALL_RANK] - value}
                for name, value in ndcg.items() if name.startswith(prefix)]
        if rows:
            lines += [f"## Ranker ablation ({split})", "", f"{RECALL_RANK}: NDCG@10 {ndcg[RECALL_RANK]:.4f}. Each row "
                      "retrains the ranker with one feature group held constant.", "",
                      pd.DataFrame(rows).to_markdown(index=False, floatfmt=".4f"), ""]
    return lines


def recommend(model: ProfileModel, store, events: pd.DataFrame, items: pd.DataFrame, positives: dict[str, float],
              k: int, users: list[str] | None, as_of: pd.Timestamp, exclude_seen: bool = True,
              two_stage=None) -> pd.DataFrame:
    """Top-k items per user as of a time: ``user_id, rank, item_id, score`` (and ``reasons`` with recall +
    rank). ``two_stage``: the saved ranker and its layout; the same ``TwoStage.top`` as ``/rank``."""
    item_ids = items["item_id"].astype(str).tolist()
    users = users if users is not None else sorted(events["user_id"].unique())
    requests = requests_at(users, as_of)
    catalogue = dataset.ItemCatalogue(store, item_ids, requests["event_timestamp"], max_buckets=1)
    scores = model_scorer(model, lambda r: user_features(store, r), catalogue)(requests)
    return top_per_user(events, items, item_ids, users, scores, positives, k, as_of, exclude_seen, two_stage)


def requests_at(users: list[str], as_of: pd.Timestamp) -> pd.DataFrame:
    """A batch scoring's requests: each user at one time, with no context and no query."""
    return pd.DataFrame({"user_id": users, "event_timestamp": as_of, "device": None, "channel": None,
                         "request_timestamp": as_of, "query": None})


def top_per_user(events: pd.DataFrame, items: pd.DataFrame, item_ids: list[str], users: list[str],
                 scores: np.ndarray, positives: dict[str, float], k: int, as_of: pd.Timestamp,
                 exclude_seen: bool = True, two_stage=None, stage: TwoStage | None = None) -> pd.DataFrame:
    """The best k per user from the towers' ``scores`` (a row per user over ``item_ids``), or recall +
    rank with them (``two_stage``: the saved ranker and spec, its sources built from ``events``; or
    ``stage``, built already); ``events``: at least these users' own (what they engaged with is left out)."""
    index = {i: n for n, i in enumerate(item_ids)}
    after = as_of + pd.Timedelta(microseconds=1)  # the newest event counts, as the online store has it
    requests = requests_at(users, after)
    seen = seen_before(events, positives, requests, index) if exclude_seen \
        else [np.zeros(0, dtype=np.int64)] * len(users)
    if stage is None and two_stage is not None and two_stage[1].serves(None):  # searches only: the towers here
        stage = stage_or_towers(two_stage, events, items, item_ids)
    if stage is not None:
        return _two_stage_recommend(stage, events, users, scores, seen, after, k)
    for r, ex in enumerate(seen):
        scores[r, ex] = -np.inf
    k = min(k, len(item_ids))
    best = torch.topk(torch.from_numpy(scores), k, dim=1)  # O(n·k), not a full sort per user
    top, top_scores = best.indices.numpy(), best.values.numpy()
    rows = {"user_id": np.repeat(users, k), "rank": np.tile(np.arange(1, k + 1), len(users)),
            "item_id": np.array(item_ids)[top].ravel(), "score": top_scores.ravel()}
    out = pd.DataFrame(rows)
    return out[np.isfinite(out["score"])].reset_index(drop=True)


def _two_stage_recommend(stage: TwoStage, events: pd.DataFrame, users: list[str], tower: np.ndarray,
                         seen: list[np.ndarray], after: pd.Timestamp, k: int) -> pd.DataFrame:
    """Each user's behaviour rebuilt from the log as the fold stores it (``EventHistories``), then
    ``TwoStage.top``, as ``/rank`` runs it on the online row."""
    histories = EventHistories(events, stage.index, stage.codes, stage.spec.behaviours.sequence)
    now = after.value / 1e9
    rows: dict[str, list] = {"user_id": [], "rank": [], "item_id": [], "score": [], "reasons": []}
    for r, user in enumerate(users):
        top = stage.top(histories.at(user, after), now, None, np.asarray(seen[r], dtype=np.int64), tower[r], k)
        rows["user_id"] += [user] * len(top.items)
        rows["rank"] += list(range(1, len(top.items) + 1))
        rows["item_id"] += [stage.item_ids[i] for i in top.items]
        rows["score"] += top.scores
        rows["reasons"] += ["; ".join(why) for why in top.reasons]
    return pd.DataFrame(rows)
