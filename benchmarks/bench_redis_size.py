"""The online store's size in Redis, per user and per item, for sizing a large shop.

    cd benchmarks && ../.venv/bin/python bench_redis_size.py

Three generated shops on the prod profile (Postgres offline store and registry, Redis online store):
2,000 users and 5,000 items, 6,000 users and 5,000 items, 2,000 users and 10,000 items, 30 days each.
Each goes through `persona features build` and `persona features materialize` into an emptied Redis
database (index 9); Redis's ``used_memory`` is read before and after, with the keys. The slopes between
the shops give the bytes each user and each item adds. Writes benchmarks/redis_size_results.json.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import redis
import sqlalchemy as sa
from bench_common import load_log, write_results

from persona import sample_data

BIN = Path(sys.executable).parent
DB = 9
PG_ADMIN = os.environ.get("PERSONA_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
SHOPS = [(2_000, 5_000), (6_000, 5_000), (2_000, 10_000)]


def fresh_database(name: str) -> str:
    engine = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return sa.engine.make_url(PG_ADMIN).set(database=name).render_as_string(hide_password=False)


def measure(users: int, items: int, root: Path) -> dict:
    ws = root / f"ws_{users}_{items}"
    shop = sample_data.generate(users, items, 30, seed=0)
    load_log(ws, shop).dispose()
    (ws / "persona.yaml").write_text("profile: prod\n")
    client = redis.Redis(host="127.0.0.1", port=6379, db=DB)
    client.flushdb()
    before = client.info("memory")["used_memory"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "BENTOML_DO_NOT_TRACK": "true",
           "PERSONA_EVENT_LOG_URL": f"sqlite:///{ws / 'eventlog.db'}",
           "PERSONA_POSTGRES_URL": fresh_database("persona_redis_bench"),
           "PERSONA_REDIS_URL": f"redis://127.0.0.1:6379/{DB}"}
    for args in (["features", "apply"], ["features", "build", "--no-check"], ["features", "materialize"]):
        subprocess.run([str(BIN / "persona"), *args, "-w", str(ws)], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = client.info("memory")["used_memory"]
    result = {"users": users, "items": items, "events": len(shop["events"]), "keys": client.dbsize(),
              "used_memory_bytes": after - before}
    client.flushdb()
    print(result, flush=True)
    return result


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        runs = [measure(users, items, Path(tmp)) for users, items in SHOPS]
    base, more_users, more_items = runs
    per_user = (more_users["used_memory_bytes"] - base["used_memory_bytes"]) / (more_users["users"] - base["users"])
    per_item = (more_items["used_memory_bytes"] - base["used_memory_bytes"]) / (more_items["items"] - base["items"])
    write_results("redis_size", {"date": datetime.now(UTC).isoformat(timespec="seconds"), "runs": runs,
                                 "bytes_per_user": round(per_user), "bytes_per_item": round(per_item),
                                 "redis": redis.Redis(host="127.0.0.1", port=6379).info("server")["redis_version"]})


if __name__ == "__main__":
    main()
