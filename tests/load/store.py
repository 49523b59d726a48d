"""Token verification under load, SQLite and Redis: 1,000 verifications a second by the server's
Authenticator while a second replica's Administration (or the CLI's) revokes tokens. Every revoked token
must be refused within ``auth.token_cache_ttl`` of its revocation, every time."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

from common.errors import Unauthenticated
from controller.auth.admin import Administration
from controller.auth.authenticate import Authenticator, Request
from controller.config import validate_config
from controller.store import make_store
from tests.load.common import check, median, percentile
from tests.support.redis_server import redis_server

RATE = 1000  # verifications a second
TTL = 1.0  # auth.token_cache_ttl for the run
TOKENS = 200


async def verify_run(config: dict[str, object], seconds: float) -> tuple[int, float, list[float], float, int]:
    """(verifications, achieved rate, latencies, worst staleness after a revocation, violations)."""
    validated = validate_config(config)
    store, ephemeral = make_store(validated)
    other_store, _ = make_store(validated)
    await store.open()
    await other_store.open()
    server = Authenticator.from_config(validated, store, ephemeral)
    admin = Administration(store, server)
    revoker = Administration(other_store)
    try:
        await admin.add_user("load", "load-password-1", "admin", "load")
        issued = [
            await admin.create_token("load", f"t{i}", ["inference"], [], None, None, "load") for i in range(TOKENS)
        ]
        revoked_at: dict[str, float] = {}
        latencies: list[float] = []
        worst = 0.0
        violations = 0
        started = time.perf_counter()
        next_revocation = started + 0.1
        count = 0
        while (now := time.perf_counter()) - started < seconds:
            if now >= next_revocation and len(revoked_at) < TOKENS - 1:
                secret, record = random.choice([t for t in issued if t[1].id not in revoked_at])
                await revoker.revoke_token(record.id, "load")
                revoked_at[record.id] = time.perf_counter()
                next_revocation += 0.1
            secret, record = random.choice(issued)
            begin = time.perf_counter()
            try:
                await server.authenticate(Request("GET", "/api/tags", {"authorization": f"Bearer {secret}"}, "", {}))
                accepted = True
            except Unauthenticated:
                accepted = False
            end = time.perf_counter()
            latencies.append(end - begin)
            count += 1
            if accepted and record.id in revoked_at:
                stale = end - revoked_at[record.id]
                worst = max(worst, stale)
                violations += stale > TTL
            pause = started + count / RATE - time.perf_counter()
            if pause > 0:
                await asyncio.sleep(pause)
        elapsed = time.perf_counter() - started
        return count, count / elapsed, latencies, worst, violations
    finally:
        await server.close()
        await store.close()
        await other_store.close()


def store_run(root: Path, quick: bool) -> None:
    seconds = 3.0 if quick else 10.0
    common = {"server": {"data_dir": str(root / "data")}, "models_dir": str(root), "auth": {"token_cache_ttl": TTL}}
    runs = {"sqlite": asyncio.run(verify_run(common, seconds))}
    with redis_server(root / "redis") as url:
        redis = {**common, "store": {"kind": "redis", "redis_url": url}}
        runs["redis"] = asyncio.run(verify_run(redis, seconds))
    print(f"\ntoken verification, {RATE}/s for {seconds:.0f} s, a revocation every 100 ms, cache TTL {TTL:g} s")
    print(f"{'store':<8}{'checks':>8}{'rate/s':>8}{'p50 µs':>9}{'p99 µs':>9}{'worst stale':>13}{'late':>6}")
    for name, (count, rate, latencies, worst, violations) in runs.items():
        p50, p99 = median(latencies) * 1e6, percentile(latencies, 0.99) * 1e6
        print(f"{name:<8}{count:>8}{rate:>8.0f}{p50:>9.0f}{p99:>9.0f}{worst:>12.2f}s{violations:>6}")
        check(violations == 0, f"store {name}: {violations} revoked tokens accepted after the TTL")
        check(rate >= 0.95 * RATE, f"store {name}: {rate:.0f} verifications/s")
