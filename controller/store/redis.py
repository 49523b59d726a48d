"""Redis store and ephemeral counters, for several replicas sharing one truth.

Layout (prefix ``lc:``): users and tokens are hashes (field-level writes: a last-used touch never undoes a
concurrent revocation), with index sets; sessions are JSON strings with a TTL; audit is a capped list.
Versioned migrations are recorded in ``lc:schema``. Run Redis with AOF (``appendonly yes``,
``appendfsync everysec``): a crash then loses at most about one second of writes (see docs/operations.md).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

from redis import asyncio as aioredis
from redis.exceptions import RedisError

from common.errors import Conflict, NotFound, Unavailable
from controller.store.base import (
    AUDIT_KEEP,
    MAX_SESSIONS_PER_USER,
    AuditEvent,
    Role,
    SessionRecord,
    TokenRecord,
    User,
    bounded_audit,
    counter_key,
    finite_or_none,
)

PREFIX = "lc:"

# Token bucket in one round trip, atomic across replicas: KEYS[1] bucket; ARGV now, per_minute.
_TAKE = """
local state = redis.call('HMGET', KEYS[1], 'tokens', 'updated')
local now = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local tokens = tonumber(state[1]) or capacity
local updated = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + (now - updated) * capacity / 60.0)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) * 60.0 / capacity end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'updated', tostring(now))
redis.call('EXPIRE', KEYS[1], 120)
return tostring(wait)
"""

# Migrations: each takes the client and brings the schema one version up.
Migration = Callable[["aioredis.Redis"], Awaitable[None]]


async def _initial(client: aioredis.Redis) -> None:
    return None  # version 1 is the layout described above; nothing existed before it


async def _fold_user_names(client: aioredis.Redis) -> None:
    """2: a user's key holds its lower-cased name (names ignore case); a record written before under another
    spelling moves there, unless a name differing only in case holds it already: then it stays where it is,
    reachable by its exact spelling."""
    names: set[str] = await client.smembers(f"{PREFIX}users")  # type: ignore[assignment]  # decoded responses
    for name in names:
        if name != name.lower():
            await client.renamenx(f"{PREFIX}user:{name}", _user_key(name))


MIGRATIONS: tuple[Migration, ...] = (_initial, _fold_user_names)


def _user_key(name: str) -> str:
    return f"{PREFIX}user:{name.lower()}"


def _user(data: dict[str, str]) -> User:
    return User(
        data["name"],
        data["password_hash"],
        cast(Role, data["role"]),
        data["disabled"] == "1",
        float(data["created_at"]),
        tuple(json.loads(data.get("models") or "[]")),  # absent in records written before allow-lists
    )


def _token(data: dict[str, str]) -> TokenRecord:
    def optional(name: str) -> float | None:
        return float(data[name]) if data.get(name) else None

    return TokenRecord(
        id=data["id"],
        name=data["name"],
        owner=data["owner"],
        secret_hash=data["secret_hash"],
        scopes=tuple(json.loads(data["scopes"])),
        models=tuple(json.loads(data["models"])),
        expires_at=finite_or_none(optional("expires_at")),
        revoked=data.get("revoked") == "1",
        created_at=float(data["created_at"]),
        last_used_at=optional("last_used_at"),
        rpm=int(data["rpm"]) if data.get("rpm") else None,
        made_by=data.get("made_by") or None,
    )


class RedisStore:
    kind = "redis"

    def __init__(self, url: str) -> None:
        self.url = url
        self._client: aioredis.Redis | None = None

    @property
    def client(self) -> aioredis.Redis:
        if self._client is None:
            raise RuntimeError("the store is not open")
        return self._client

    async def _call(self, work: Awaitable[Any]) -> Any:
        try:
            return await work
        except RedisError as exc:
            raise Unavailable(f"the store (redis) is unavailable: {exc.__class__.__name__}") from exc

    async def open(self) -> None:
        self._client = aioredis.Redis.from_url(self.url, decode_responses=True)
        version = int(await self._call(self.client.get(f"{PREFIX}schema")) or 0)
        for number, migrate in enumerate(MIGRATIONS[version:], start=version + 1):
            await self._call(migrate(self.client))
            await self._call(self.client.set(f"{PREFIX}schema", number))

    async def problem(self) -> None:
        return None  # an unreachable Redis shows in the requests that need it (503)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # ------------------------------------------------------------------ users

    async def add_user(self, user: User) -> None:
        fields: dict[Any, Any] = {
            "name": user.name,
            "password_hash": user.password_hash,
            "role": user.role,
            "disabled": "1" if user.disabled else "0",
            "created_at": str(user.created_at),
            "models": json.dumps(list(user.models)),
        }
        key = _user_key(user.name)
        # HSETNX on "name" claims the name, in any case, atomically; the other fields follow.
        if not await self._call(self.client.hsetnx(key, "name", user.name)):
            raise Conflict(f"user '{user.name}' exists already (user names ignore case)")
        await self._call(self.client.hset(key, mapping=fields))
        await self._call(self.client.sadd(f"{PREFIX}users", user.name))

    async def _find_user(self, name: str) -> tuple[str, dict[str, str]] | None:
        """(key, fields) of a user named in any case: where names written before differ only in case, the
        exact spelling first (see _fold_user_names)."""
        keys = [f"{PREFIX}user:{name}", _user_key(name)] if name != name.lower() else [_user_key(name)]
        for key in keys:
            data = await self._call(self.client.hgetall(key))
            if data.get("password_hash"):
                return key, data
        return None

    async def get_user(self, name: str) -> User | None:
        found = await self._find_user(name)
        return _user(found[1]) if found else None

    async def list_users(self) -> Sequence[User]:
        names = sorted(await self._call(self.client.smembers(f"{PREFIX}users")))
        users = [await self.get_user(name) for name in names]
        return [user for user in users if user is not None]

    async def update_user(
        self,
        name: str,
        *,
        password_hash: str | None = None,
        disabled: bool | None = None,
        role: Role | None = None,
        models: tuple[str, ...] | None = None,
    ) -> User:
        found = await self._find_user(name)
        if found is None:
            raise NotFound(f"user '{name}' not found")
        key, data = found
        changes: dict[Any, Any] = {}
        if models is not None:
            changes["models"] = json.dumps(list(models))
        if password_hash is not None:
            changes["password_hash"] = password_hash
        if disabled is not None:
            changes["disabled"] = "1" if disabled else "0"
        if role is not None:
            changes["role"] = role
        if changes:
            await self._call(self.client.hset(key, mapping=changes))
            data = await self._call(self.client.hgetall(key))
        return _user(data)

    # ------------------------------------------------------------------ tokens

    async def add_token(self, token: TokenRecord) -> None:
        fields: dict[Any, Any] = {
            "id": token.id,
            "name": token.name,
            "owner": token.owner,
            "secret_hash": token.secret_hash,
            "scopes": json.dumps(token.scopes),
            "models": json.dumps(token.models),
            "expires_at": "" if token.expires_at is None else str(token.expires_at),
            "revoked": "1" if token.revoked else "0",
            "created_at": str(token.created_at),
            "last_used_at": "" if token.last_used_at is None else str(token.last_used_at),
            "rpm": "" if token.rpm is None else str(token.rpm),
            "made_by": token.made_by or "",
        }
        key = f"{PREFIX}token:{token.id}"
        if not await self._call(self.client.hsetnx(key, "id", token.id)):
            raise Conflict(f"token id '{token.id}' exists already")
        await self._call(self.client.hset(key, mapping=fields))
        await self._call(self.client.sadd(f"{PREFIX}tokens", token.id))

    async def get_token(self, token_id: str) -> TokenRecord | None:
        data = await self._call(self.client.hgetall(f"{PREFIX}token:{token_id}"))
        return _token(data) if data.get("secret_hash") else None

    async def list_tokens(self) -> Sequence[TokenRecord]:
        ids = await self._call(self.client.smembers(f"{PREFIX}tokens"))
        tokens = [await self.get_token(token_id) for token_id in ids]
        return sorted((t for t in tokens if t is not None), key=lambda t: t.created_at)

    async def revoke_token(self, token_id: str) -> bool:
        key = f"{PREFIX}token:{token_id}"
        if not await self._call(self.client.exists(key)):
            return False
        await self._call(self.client.hset(key, "revoked", "1"))
        return True

    async def touch_token(self, token_id: str, at: float) -> None:
        key = f"{PREFIX}token:{token_id}"
        if await self._call(self.client.exists(key)):
            await self._call(self.client.hset(key, "last_used_at", str(at)))

    # ------------------------------------------------------------------ sessions

    async def add_session(self, session: SessionRecord) -> None:
        ttl = max(1, int(session.expires_at - time.time()))
        value = json.dumps({"user": session.user, "created_at": session.created_at, "expires_at": session.expires_at})
        await self._call(self.client.set(f"{PREFIX}session:{session.id_hash}", value, ex=ttl))
        index = f"{PREFIX}user-sessions:{session.user}"
        await self._call(self.client.sadd(index, session.id_hash))
        if await self._call(self.client.scard(index)) > MAX_SESSIONS_PER_USER:
            await self._prune_sessions(index)

    async def _prune_sessions(self, index: str) -> None:
        """Drop the index's expired sessions, then end the oldest beyond the bound (the index once only grew)."""
        hashes = list(await self._call(self.client.smembers(index)))
        values = await self._call(self.client.mget([f"{PREFIX}session:{h}" for h in hashes]))
        live = sorted(
            ((json.loads(value)["created_at"], h) for h, value in zip(hashes, values, strict=True) if value),
            reverse=True,
        )
        ended = [h for h, value in zip(hashes, values, strict=True) if not value]
        ended += [h for _, h in live[MAX_SESSIONS_PER_USER:]]
        if ended:
            await self._call(self.client.delete(*(f"{PREFIX}session:{h}" for h in ended)))
            await self._call(self.client.srem(index, *ended))

    async def get_session(self, id_hash: str) -> SessionRecord | None:
        value = await self._call(self.client.get(f"{PREFIX}session:{id_hash}"))
        if value is None:
            return None
        data = json.loads(value)
        if data["expires_at"] <= time.time():
            return None
        return SessionRecord(id_hash, data["user"], data["created_at"], data["expires_at"])

    async def delete_session(self, id_hash: str) -> None:
        await self._call(self.client.delete(f"{PREFIX}session:{id_hash}"))

    async def delete_user_sessions(self, user: str) -> None:
        index = f"{PREFIX}user-sessions:{user}"
        hashes = await self._call(self.client.smembers(index))
        if hashes:
            await self._call(self.client.delete(*(f"{PREFIX}session:{h}" for h in hashes)))
        await self._call(self.client.delete(index))

    # ------------------------------------------------------------------ audit

    async def add_audit(self, event: AuditEvent) -> None:
        event = bounded_audit(event)
        value = json.dumps(
            {
                "at": event.at,
                "action": event.action,
                "actor": event.actor,
                "target": event.target,
                "detail": event.detail,
            }
        )
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.lpush(f"{PREFIX}audit", value)
            pipe.ltrim(f"{PREFIX}audit", 0, AUDIT_KEEP - 1)
            await self._call(pipe.execute())

    async def list_audit(self, limit: int = 100) -> Sequence[AuditEvent]:
        values = await self._call(self.client.lrange(f"{PREFIX}audit", 0, limit - 1))
        events = [json.loads(v) for v in values]
        return [AuditEvent(e["at"], e["action"], e["actor"], e["target"], e["detail"]) for e in events]


class RedisEphemeral:
    """Shared counters: every replica sees the same buckets, failures and nonces."""

    def __init__(self, store: RedisStore) -> None:
        self._store = store
        self._take: Any = None

    async def take(self, key: str, per_minute: int) -> float:
        if self._take is None:
            self._take = self._store.client.register_script(_TAKE)
        wait = await self._store._call(
            self._take(keys=[f"{PREFIX}rl:{counter_key(key)}"], args=[time.time(), per_minute])
        )
        return float(wait)

    async def failures(self, key: str) -> int:
        return int(await self._store._call(self._store.client.get(f"{PREFIX}fail:{counter_key(key)}")) or 0)

    async def add_failure(self, key: str, window: float) -> int:
        full = f"{PREFIX}fail:{counter_key(key)}"
        async with self._store.client.pipeline(transaction=True) as pipe:
            pipe.incr(full)
            pipe.expire(full, max(1, int(window)), nx=True)
            count, _ = await self._store._call(pipe.execute())
        return int(count)

    async def clear_failures(self, key: str) -> None:
        await self._store._call(self._store.client.delete(f"{PREFIX}fail:{counter_key(key)}"))

    async def claim_nonce(self, nonce: str, ttl: float) -> bool:
        created = await self._store._call(
            self._store.client.set(f"{PREFIX}nonce:{counter_key(nonce)}", "1", nx=True, px=max(1, int(ttl * 1000)))
        )
        return bool(created)

    async def close(self) -> None:
        return None
