"""Feature-store benchmarks (issue 4), on real stores.

- the feature pipeline over ~1M events (local; target <= 60 s);
- materialize of 100k users into SQLite and Redis (rows/s);
- get_historical_features for 1M entity rows through the FeatureService (local target <= 60 s; spark);
- get_online_features for one user through the FeatureService, p50/p99 in-process (target p99 <= 5 ms).

Needs local Postgres and Redis (``make bench`` starts them). Writes benchmarks/features_results.json.
"""

from __future__ import annotations

import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import redis
import sqlalchemy as sa
from bench_common import load_log, percentiles, timed, write_results

from feature_repo.pipeline import materialize, offline, registry
from feature_repo.pipeline.build import build
from persona import sample_data

N_USERS = int(os.environ.get("BENCH_USERS", 29_000))
HIST_ROWS = int(os.environ.get("BENCH_HIST_ROWS", 1_000_000))
PG_ADMIN = os.environ.get("PERSONA_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def online_latency(store, users: list[str], n: int = 500) -> dict:
    service = store.get_feature_service("profile_v1")
    now = datetime.now(UTC)
    rng = np.random.default_rng(0)
    for u in users[:20]:  # warm up connections and caches
        store.get_online_features(features=service, entity_rows=[
            {"user_id": u, "device": "app", "channel": "search", "request_timestamp": now}])
    samples = []
    for u in rng.choice(users, n):
        start = time.perf_counter()
        store.get_online_features(features=service, entity_rows=[
            {"user_id": str(u), "device": "app", "channel": "search", "request_timestamp": now}])
        samples.append(time.perf_counter() - start)
    return percentiles(samples)


def materialize_rate(ws: Path, profile: str, behaviour: pd.DataFrame) -> dict:
    registry.apply(ws, profile)
    tables = {"user_behaviour": behaviour}
    offline.write_offline(profile, ws, tables)
    store = registry.feature_store(ws)
    _, secs = timed(lambda: store.materialize(start_date=datetime(1970, 1, 1, tzinfo=UTC),
                                              end_date=datetime.now(UTC), feature_views=["user_behaviour"]))
    return {"users": len(behaviour), "seconds": round(secs, 2), "rows_per_second": round(len(behaviour) / secs)}


def main() -> None:
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    results: dict = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shop = sample_data.generate(N_USERS, 10_000, 30, seed=0)
        ws = tmp / "local"
        log = load_log(ws, shop)
        tables, secs = timed(lambda: build(log, "local", ws))
        results["pipeline_local"] = {"events": len(shop["events"]), "seconds": round(secs, 2)}
        print(f"feature pipeline: {len(shop['events']):,} events in {secs:.1f} s", flush=True)

        # Materialize 100k users: the newest behaviour rows, repeated under new ids.
        newest = tables["user_behaviour"].sort_values("event_timestamp").groupby("user_id").tail(1)
        reps = int(np.ceil(100_000 / len(newest)))
        big = pd.concat([newest.assign(user_id=newest["user_id"] + f"_{r}") for r in range(reps)]).head(100_000)
        results["materialize_sqlite"] = materialize_rate(tmp / "mat_sqlite", "local", big)
        print("materialize sqlite:", results["materialize_sqlite"], flush=True)
        db_name = f"persona_bench_{os.getpid()}"
        admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{db_name}"'))
        os.environ["PERSONA_POSTGRES_URL"] = PG_ADMIN.rsplit("/", 1)[0] + f"/{db_name}"
        os.environ["PERSONA_REDIS_URL"] = "redis://127.0.0.1:6379/14"
        redis.Redis(db=14).flushdb()
        try:
            results["materialize_redis"] = materialize_rate(tmp / "mat_redis", "prod", big)
            print("materialize redis:", results["materialize_redis"], flush=True)
            redis_store = registry.feature_store(tmp / "mat_redis")
            users = list(big["user_id"].head(5000))
            samples = []
            for u in users[:500]:
                start = time.perf_counter()
                redis_store.get_online_features(features=["user_behaviour:view_count_30d"],
                                                entity_rows=[{"user_id": u}])
                samples.append(time.perf_counter() - start)
            results["online_redis_one_view"] = percentiles(samples)
        finally:
            redis.Redis(db=14).flushdb()
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))

        # Full local workspace: apply, materialize, then historical and online reads.
        store, _ = registry.apply(ws, "local")
        offline.write_offline("local", ws, tables)
        materialize.materialize(ws, full=True)
        ev = shop["events"].sample(min(HIST_ROWS, len(shop["events"])), random_state=0)
        entity = pd.DataFrame({"user_id": ev["user_id"].to_numpy(), "event_timestamp": ev["event_timestamp"].to_numpy(),
                               "device": ev["device"].to_numpy(), "channel": ev["channel"].to_numpy(),
                               "request_timestamp": ev["event_timestamp"].to_numpy()})
        service = store.get_feature_service("profile_v1")
        hist, secs = timed(lambda: store.get_historical_features(entity_df=entity, features=service).to_df())
        assert len(hist) == len(entity)
        results["historical_local"] = {"entity_rows": len(entity), "seconds": round(secs, 2)}
        print("historical local:", results["historical_local"], flush=True)
        users = list(newest["user_id"])
        results["online_sqlite_profile_v1"] = online_latency(store, users)
        print("online sqlite:", results["online_sqlite_profile_v1"], flush=True)

        # Redis online store with the full profile_v1 service.
        os.environ["PERSONA_POSTGRES_URL"] = PG_ADMIN.rsplit("/", 1)[0] + f"/{db_name}"
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{db_name}"'))
        redis.Redis(db=14).flushdb()
        try:
            pws = tmp / "prod"
            pstore, _ = registry.apply(pws, "prod")
            offline.write_offline("prod", pws, {k: v for k, v in tables.items() if k != "user_behaviour"}
                                 | {"user_behaviour": newest})
            materialize.materialize(pws, full=True)
            results["online_redis_profile_v1"] = online_latency(pstore, users)
            print("online redis:", results["online_redis_profile_v1"], flush=True)
        finally:
            redis.Redis(db=14).flushdb()
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))
            admin.dispose()

        # Spark offline store: historical retrieval over the same tables.
        try:
            import pyspark  # noqa: F401

            sws = tmp / "spark"
            sstore, _ = registry.apply(sws, "spark")
            offline.write_offline("spark", sws, tables)
            # Feast's Spark store collects the whole result on the driver: 1M rows x 58 columns overflow a
            # 4 GB local driver here, so the default is 200k rows (BENCH_SPARK_ROWS overrides).
            spark_rows = int(os.environ.get("BENCH_SPARK_ROWS", 200_000))
            sent = entity.head(spark_rows)
            shist, secs = timed(lambda: sstore.get_historical_features(
                entity_df=sent, features=sstore.get_feature_service("profile_v1")).to_df())
            results["historical_spark"] = {"entity_rows": len(sent), "seconds": round(secs, 2)}
            print("historical spark:", results["historical_spark"], flush=True)
        except ImportError:
            results["historical_spark"] = "pyspark not installed"
        log.dispose()
    write_results("features", results)


if __name__ == "__main__":
    main()
