"""The workspace's ``feature_store.yaml``: where each profile keeps Feast's registry, online store
and offline store."""

from __future__ import annotations

import os
from pathlib import Path

import sqlalchemy as sa
import yaml

REPO_DIR = Path(__file__).resolve().parents[1]
PROJECT = "persona"
TABLES = ("user_personal", "user_behaviour", "user_activity", "user_text", "user_sequence", "item_features")


def yaml_path(workspace: Path) -> Path:
    return workspace / "feature_store.yaml"


def _pg_parts(url: str) -> dict:
    u = sa.engine.make_url(url)
    return {"host": u.host or "127.0.0.1", "port": u.port or 5432, "database": u.database or "postgres",
            "user": u.username or "postgres", "sslmode": u.query.get("sslmode", "disable"),
            "has_password": bool(u.password)}


def _serving_stores() -> dict:
    """The registry (SQL, on Postgres) and the online store (Redis) that the service reads in production."""
    redis_url = os.environ.get("PERSONA_REDIS_URL", "redis://127.0.0.1:6379/0")
    r = sa.engine.make_url(redis_url)
    redis_conn = f"{r.host or '127.0.0.1'}:{r.port or 6379},db={r.database or 0}"
    if r.password:
        redis_conn += ",password=${PERSONA_REDIS_PASSWORD}"
    return {"registry": {"registry_type": "sql", "path": "${PERSONA_POSTGRES_URL}", "cache_ttl_seconds": 60},
            "online_store": {"type": "redis", "connection_string": redis_conn}}


def feature_store_config(profile: str, workspace: Path) -> dict:
    """The Feast config of a profile. Secrets stay ``${ENV}`` references that Feast expands at load."""
    ws = workspace.resolve()
    local_registry = {"registry_type": "sql", "path": f"sqlite:///{ws / 'feast' / 'registry.db'}",
                      "cache_ttl_seconds": 60}
    sqlite_online = {"type": "sqlite", "path": str(ws / "feast" / "online.db")}
    cfg: dict = {"project": PROJECT, "provider": "local", "entity_key_serialization_version": 3}
    if profile == "local":
        cfg |= {"registry": local_registry, "online_store": sqlite_online, "offline_store": {"type": "duckdb"}}
    elif profile == "prod":
        pg_url = os.environ.get("PERSONA_POSTGRES_URL")
        if not pg_url:
            raise ValueError("profile 'prod' needs PERSONA_POSTGRES_URL (a SQLAlchemy URL) in the environment")
        parts = _pg_parts(pg_url)
        cfg |= {
            **_serving_stores(),
            "offline_store": {"type": "postgres", "host": parts["host"], "port": parts["port"],
                              "database": parts["database"], "db_schema": "public", "user": parts["user"],
                              "password": "${PERSONA_POSTGRES_PASSWORD}" if parts["has_password"] else "",
                              "sslmode": parts["sslmode"]},
        }
    elif profile == "spark":
        # With PERSONA_POSTGRES_URL (a production deployment), the registry and the online store are the
        # prod profile's, which the service reads: the Spark build then feeds the service. Else the
        # workspace's SQLite files, as on the local profile.
        stores = _serving_stores() if os.environ.get("PERSONA_POSTGRES_URL") else \
            {"registry": local_registry, "online_store": sqlite_online}
        cfg |= {**stores,
                "offline_store": {"type": "spark", "spark_conf": {
                    "spark.master": os.environ.get("PERSONA_SPARK_MASTER", "local[2]"),
                    # where executors reach the driver: this machine, or the driver pod's address on a cluster
                    "spark.driver.host": os.environ.get("PERSONA_SPARK_DRIVER_HOST", "127.0.0.1"),
                    "spark.ui.enabled": "false",
                    "spark.driver.memory": os.environ.get("PERSONA_SPARK_DRIVER_MEMORY", "4g"),
                    "spark.sql.session.timeZone": "UTC", "spark.sql.shuffle.partitions": "4",
                    "spark.sql.execution.arrow.pyspark.enabled": "true"}}}
    else:
        raise ValueError(f"unknown profile {profile!r}")
    return cfg


def write_yaml(profile: str, workspace: Path) -> Path:
    path = yaml_path(workspace)
    (workspace / "feast").mkdir(parents=True, exist_ok=True)
    path.write_text(f"# Written by `persona features apply` for profile {profile!r}. Use it with\n"
                    f"#   feast -c {REPO_DIR} -f {path} plan\n"
                    + yaml.safe_dump(feature_store_config(profile, workspace), sort_keys=False))
    return path
