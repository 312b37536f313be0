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
