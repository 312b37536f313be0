"""Shared fixtures: small generated shops, workspaces, and real SQLite/Postgres event logs."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa

from eventlog.store import EventLog
from persona import sample_data

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
PG_ADMIN_URL = os.environ.get("PERSONA_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def shop() -> dict[str, pd.DataFrame]:
    """A small but complete synthetic shop (about 5k events)."""
    return sample_data.generate(n_users=150, n_items=120, days=14, seed=11)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """A randomly initialised two-layer BERT with MiniLM's tokenizer: fast unit-test training."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from training.model import default_bert_path

    folder = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(default_bert_path()).save_pretrained(folder)
    return str(folder)


@pytest.fixture
def shop_dir(tmp_path: Path, shop) -> Path:
    folder = tmp_path / "shop"
    sample_data.write(shop, folder, "csv")
    return folder


@pytest.fixture
def sqlite_log(tmp_path: Path):
    log = EventLog(f"sqlite:///{tmp_path / 'eventlog.db'}")
    yield log
    log.dispose()


@pytest.fixture
def pg_url():
    """A fresh, throw-away Postgres database on the local server."""
    name = f"persona_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:  # pragma: no cover - the machine kind runs Postgres
        pytest.fail(f"Postgres is not reachable at {PG_ADMIN_URL}: {exc}")
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    yield url
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def fresh_bentoml_metrics():
    """BentoML registers its HTTP metrics in prometheus' global registry when an in-process app
    starts; a second such app in one test session would register them again and fail."""
    import prometheus_client

    registry = prometheus_client.REGISTRY
    for collector, names in list(registry._collector_to_names.items()):  # noqa: SLF001 - no public listing
        if any(name.startswith("bentoml_") for name in names):
            registry.unregister(collector)
