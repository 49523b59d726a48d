"""``Authenticator.authenticate()``: the one function that turns a request's credentials into an Identity.

Two callers, one function: ``GET /auth/verify`` (Caddy's forward_auth, which then copies our signed
identity header onto the proxied request) and the app itself for requests that arrive directly. A request
carrying the identity header must carry a valid one — signed by us, unexpired, bound to this method and
path, and never seen before (one-time nonce) — so skipping the edge or replaying a header gains nothing.

Credentials, in order: the signed identity header; an API token as ``Authorization: Bearer``, ``x-api-key``
or the password of ``Authorization: Basic`` (clients differ); the web session cookie (plus a CSRF token
for state-changing requests). Token lookups are cached for ``token_cache_ttl`` seconds, so a revocation
takes effect within seconds, across replicas too (they share the store).

Changing users and tokens is controller/auth/admin.py's ``Administration``; it empties this cache (``forget``)
when it changes what a cached lookup says.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

from common import wire
from common.background import Background
from common.errors import Forbidden, RateLimited, Unauthenticated
from controller.auth.accounts import audit, is_user_name
from controller.auth.identity import ROLE_SCOPES, Identity, Scope
from controller.auth.password_work import PasswordWork
from controller.auth.secrets import (
    digest,
    load_or_create_key,
    parse_token,
    same,
    sign_claims,
    verify_claims,
    verify_password,
)
from controller.config import AuthConfig, Config
from controller.store.base import Ephemeral, SessionRecord, Store, TokenRecord, User

log = logging.getLogger(__name__)

IDENTITY_HEADER = wire.IDENTITY_HEADER.lower()  # as the request object carries header names
SESSION_COOKIE = "lc_session"
CSRF_HEADER = "x-csrf-token"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_TOUCH_EVERY = 60.0  # last-used time is written at most once a minute per token
_CACHE_LIMIT = 10_000


@dataclass
class _Cached:
    token: TokenRecord | None
    owner: User | None
    fetched: float


@dataclass(frozen=True)
class Request:
    """What authentication needs to know about a request."""

    method: str
    path: str
    headers: Mapping[str, str]  # lower-case names
    client: str
    cookies: Mapping[str, str]


class Authenticator:
    """Who is asking, and may they: verifying an API token, a web session or the edge's signed identity
    (``authenticate``, ``revalidate``, ``authorize``), signing that identity (``sign_identity``), signing in and
    out with a password (``login``, ``logout``, ``csrf_token``), and what those keep: the verify cache, the
    per-token rate limits and the sign-in throttle (in the ``Ephemeral``), the last-used writes, the signing and
    session keys, and the bound on password checks at once (``password_work``, which administration shares)."""

    def __init__(
        self,
        settings: AuthConfig,
        store: Store,
        ephemeral: Ephemeral,
        identity_key: bytes,
        session_key: bytes,
    ) -> None:
        self.settings = settings
        self.store = store
        self.ephemeral = ephemeral
        self._identity_key = identity_key
        self._session_key = session_key
        self._cache: dict[str, _Cached] = {}
        self._touched: dict[str, float] = {}
        self._background = Background()
        self.password_work = PasswordWork()

    @classmethod
    def from_config(cls, config: Config, store: Store, ephemeral: Ephemeral) -> Authenticator:
        """With the signing and session keys of the config's secrets dir (made on first use)."""
        return cls(
            config.auth,
            store,
            ephemeral,
            load_or_create_key(config.secrets_dir / "identity.key"),
            load_or_create_key(config.secrets_dir / "session.key"),
        )

    def forget(self, token_id: str | None = None) -> None:
        """Drop a token's cached lookup (every token's with none), so that this process reads the store again
        at its next use; other processes see the change within ``token_cache_ttl``."""
        if token_id is None:
            self._cache.clear()
        else:
            self._cache.pop(token_id, None)

    # ------------------------------------------------------------------ authenticate

    async def authenticate(self, request: Request) -> Identity:
        """The caller's identity, or Unauthenticated / RateLimited / Forbidden (CSRF)."""
        if not self.settings.enabled:
            return Identity("anonymous", "anonymous", frozenset({Scope.ADMIN}))
        signed = request.headers.get(IDENTITY_HEADER)
        if signed is not None:
            return await self._from_identity_header(signed, request.method, request.path)
        token = self._presented_token(request.headers)
        if token is not None:
            return await self._from_token(token)
        cookie = request.cookies.get(SESSION_COOKIE)
        if cookie:
            return await self._from_session(cookie, request)
        raise Unauthenticated("authentication required: send 'Authorization: Bearer <API token>'")

    def authorize(self, identity: Identity, scope: str) -> None:
        if not identity.has(scope):
            raise Forbidden(f"this {identity.via} lacks the '{scope}' scope")

    @staticmethod
    def _presented_token(headers: Mapping[str, str]) -> str | None:
        authorization = headers.get("authorization", "")
        kind, _, value = authorization.partition(" ")
        if kind.lower() == "bearer" and value.strip():
            return value.strip()
        if kind.lower() == "basic" and value.strip():
            try:
                decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                raise Unauthenticated("malformed Basic credentials") from None
            return decoded.partition(":")[2] or decoded
        if authorization:
            raise Unauthenticated("unsupported Authorization scheme: use 'Bearer <API token>'")
        api_key = headers.get("x-api-key", "").strip()
        return api_key or None

    async def _lookup(self, token_id: str) -> _Cached:
        now = time.monotonic()
        cached = self._cache.get(token_id)
        if cached is not None and now - cached.fetched < self.settings.token_cache_ttl:
            return cached
        token = await self.store.get_token(token_id)
        owner = await self.store.get_user(token.owner) if token else None
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        cached = self._cache[token_id] = _Cached(token, owner, now)
        return cached

    async def _from_token(self, presented: str) -> Identity:
        parsed = parse_token(presented)
        if parsed is None:
            raise Unauthenticated("malformed API token: tokens look like lc_<id>_<secret>")
        token_id, secret = parsed
        cached = await self._lookup(token_id)
        token, owner = cached.token, cached.owner
        # Compare even for unknown ids, so the answer takes as long either way.
        matches = same(digest(secret), token.secret_hash if token else digest(secrets.token_urlsafe(32)))
        if token is None or not matches:
            raise Unauthenticated("invalid API token")
        identity = _token_identity(token, owner)
        if token.rpm:
            wait = await self.ephemeral.take(f"token:{token.id}", token.rpm)
            if wait > 0:
                raise RateLimited(f"rate limit of {token.rpm} requests per minute reached", wait)
        self._touch(token.id)
        return identity

    def _touch(self, token_id: str) -> None:
        now = time.time()
        if now - self._touched.get(token_id, 0.0) < _TOUCH_EVERY:
            return
        self._touched[token_id] = now
        self._background.spawn(self.store.touch_token(token_id, now), "recording a token's last use")

    async def close(self) -> None:
        """Let pending last-used writes finish before the store closes."""
        await self._background.drain()

    async def _from_session(self, cookie: str, request: Request) -> Identity:
        session = await self.store.get_session(digest(cookie))
        if session is None:
            raise Unauthenticated("session expired or signed out: sign in again")
        identity = _session_identity(session, await self.store.get_user(session.user))
        if request.method in UNSAFE_METHODS:
            presented = request.headers.get(CSRF_HEADER, "")
            if not presented or not same(presented, self.csrf_token(cookie)):
                raise Forbidden("missing or wrong CSRF token (X-CSRF-Token)")
        return identity

    async def revalidate(self, identity: Identity) -> Identity:
        """``identity`` as it stands now, for a request that lasts (an event stream) and asks again: Unauthenticated
        once what it was established from no longer holds (token revoked or expired, session signed out or
        expired, account disabled); else the identity with today's scopes and allow-lists. Counts against no
        rate limit: the request was counted when it came."""
        if not self.settings.enabled:
            return identity
        if identity.token_id is not None:
            cached = await self._lookup(identity.token_id)
            if cached.token is None:
                raise Unauthenticated("invalid API token")
            return replace(_token_identity(cached.token, cached.owner), via=identity.via)
        if identity.session_hash is not None:
            session = await self.store.get_session(identity.session_hash)
            if session is None:
                raise Unauthenticated("session expired or signed out: sign in again")
            return _session_identity(session, await self.store.get_user(session.user))
        user = await self.store.get_user(identity.subject)  # the edge's signed identity of a web session
        if user is None or user.disabled:
            raise Unauthenticated("this account is disabled")
        scopes = identity.scopes if user.role == "admin" else identity.scopes - {Scope.ADMIN}
        return replace(identity, scopes=scopes, owner_models=user.models)

    # ------------------------------------------------------------------ the edge's signed identity

    def sign_identity(self, identity: Identity, method: str, path: str) -> str:
        claims = {
            "sub": identity.subject,
            "via": identity.via,
            "scp": sorted(identity.scopes),
            "mdl": list(identity.models),
            "omd": list(identity.owner_models),
            "tid": identity.token_id,
            "rpm": identity.rpm,
            "tex": identity.expires_at,
            "exp": time.time() + self.settings.identity_ttl,
            "m": method,
            "p": path,
        }
        return sign_claims(self._identity_key, claims)

    async def _from_identity_header(self, value: str, method: str, path: str) -> Identity:
        signed = verify_claims(self._identity_key, value)
        if signed is None:
            raise Unauthenticated("invalid identity header")
        claims = signed.claims
        if not isinstance(claims.get("exp"), int | float) or claims["exp"] <= time.time():
            raise Unauthenticated("expired identity header")
        if claims.get("m") != method or claims.get("p") != path:
            raise Unauthenticated("identity header was issued for another request")
        if not await self.ephemeral.claim_nonce(signed.nonce, self.settings.identity_ttl + 5):
            raise Unauthenticated("identity header was already used")
        return Identity(
            str(claims["sub"]),
            "edge",
            frozenset(claims.get("scp") or ()),
            tuple(claims.get("mdl") or ()),
            tuple(claims.get("omd") or ()),
            token_id=claims.get("tid"),
            rpm=claims.get("rpm"),
            expires_at=claims.get("tex"),
        )

    # ------------------------------------------------------------------ sessions

    def csrf_token(self, cookie: str) -> str:
        return hmac.new(self._session_key, cookie.encode(), hashlib.sha256).hexdigest()

    async def login(self, username: str, password: str, client: str) -> tuple[str, User]:
        """Check the password (throttled per user and address) and open a new session: (cookie, user)."""
        if not is_user_name(username):
            # No account has such a name: refuse before anything is counted or audited, so a sign-in with a
            # 20 MB name costs nothing to keep.
            raise Unauthenticated("invalid user name or password")
        account = f"login:{username.lower()}"  # names ignore case, so does the throttle
        key = f"{account}:{client}"
        if (
            await self.ephemeral.failures(key) >= self.settings.login_max_failures
            or await self.ephemeral.failures(account) >= self.settings.login_max_failures_per_user
        ):
            raise RateLimited("too many failed sign-ins: wait and try again", self.settings.login_window)
        user = await self.store.get_user(username)
        matches = await self.password_work.run(verify_password, password, user.password_hash if user else None)
        if not matches or user is None or user.disabled:
            await self.ephemeral.add_failure(key, self.settings.login_window)
            await self.ephemeral.add_failure(account, self.settings.login_window)
            await audit(self.store, "login_failed", username, username, {"client": client})
            raise Unauthenticated("invalid user name or password")
        await self.ephemeral.clear_failures(key)  # the account's count stays: other addresses' guesses remain
        cookie = secrets.token_urlsafe(32)  # always new: a session id chosen before sign-in is never reused
        now = time.time()
        await self.store.add_session(SessionRecord(digest(cookie), user.name, now, now + self.settings.session_ttl))
        await audit(self.store, "login", user.name, user.name, {"client": client})
        return cookie, user

    async def logout(self, identity: Identity) -> None:
        if identity.session_hash:
            await self.store.delete_session(identity.session_hash)
            await audit(self.store, "logout", identity.subject, identity.subject)


def _token_identity(token: TokenRecord, owner: User | None) -> Identity:
    """Who a (matching) token speaks for, or Unauthenticated when it no longer may."""
    if token.revoked:
        raise Unauthenticated("this API token has been revoked")
    if token.expires_at is not None and token.expires_at <= time.time():
        raise Unauthenticated("this API token has expired")
    if owner is None or owner.disabled:
        raise Unauthenticated("the owner of this API token is disabled")
    scopes = frozenset(token.scopes)
    if owner.role != "admin":
        scopes -= {Scope.ADMIN}  # a token never gives more than its owner has
    return Identity(
        owner.name,
        "token",
        scopes,
        token.models,
        owner.models,
        token_id=token.id,
        rpm=token.rpm,
        expires_at=token.expires_at,
    )


def _session_identity(session: SessionRecord, user: User | None) -> Identity:
    if user is None or user.disabled:
        raise Unauthenticated("this account is disabled")
    return Identity(user.name, "session", ROLE_SCOPES[user.role], user.models, session_hash=session.id_hash)
