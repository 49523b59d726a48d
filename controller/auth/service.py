"""``AuthService.authenticate()``: the one function that turns a request's credentials into an Identity.

Two callers, one function: ``GET /auth/verify`` (Caddy's forward_auth, which then copies our signed
identity header onto the proxied request) and the app itself for requests that arrive directly. A request
carrying the identity header must carry a valid one — signed by us, unexpired, bound to this method and
path, and never seen before (one-time nonce) — so skipping the edge or replaying a header gains nothing.

Credentials, in order: the signed identity header; an API token as ``Authorization: Bearer``, ``x-api-key``
or the password of ``Authorization: Basic`` (clients differ); the web session cookie (plus a CSRF token
for state-changing requests). Token lookups are cached for ``token_cache_ttl`` seconds, so a revocation
takes effect within seconds, across replicas too (they share the store).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from common.background import Background
from common.errors import BadRequest, Forbidden, NotFound, RateLimited, Unauthenticated
from controller.auth.bounds import Grant, check_glob_count, check_name, check_rpm, expiry_seconds, within_maker
from controller.auth.identity import ROLE_SCOPES, Identity, Scope
from controller.auth.password_work import PasswordWork
from controller.auth.secrets import (
    digest,
    hash_password,
    load_or_create_key,
    new_token,
    parse_token,
    same,
    sign_claims,
    verify_claims,
    verify_password,
)
from controller.config import AuthConfig, Config
from controller.names import validate_model_name
from controller.store.base import AuditEvent, Ephemeral, Role, SessionRecord, Store, TokenRecord, User

log = logging.getLogger(__name__)

IDENTITY_HEADER = "x-llamacontroller-identity"
SESSION_COOKIE = "lc_session"
CSRF_HEADER = "x-csrf-token"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_TOUCH_EVERY = 60.0  # last-used time is written at most once a minute per token
_CACHE_LIMIT = 10_000
_USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


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


def _validate_globs(globs: tuple[str, ...]) -> None:
    check_glob_count(globs)
    for glob in globs:
        validate_model_name(glob.replace("*", "x").replace("?", "x"))


def validate_user_name(name: str) -> str:
    if not isinstance(name, str) or _USER_NAME.fullmatch(name) is None:
        shown = repr(name[:65]) + ("…" if len(name) > 65 else "") if isinstance(name, str) else "(not text)"
        raise BadRequest(f"invalid user name {shown}: letters, digits, '.', '_' and '-', at most 64")
    return name


class AuthService:
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
        self._password_work = PasswordWork()

    @classmethod
    def from_config(cls, config: Config, store: Store, ephemeral: Ephemeral) -> AuthService:
        """With the signing and session keys of the config's secrets dir (made on first use)."""
        return cls(
            config.auth,
            store,
            ephemeral,
            load_or_create_key(config.secrets_dir / "identity.key"),
            load_or_create_key(config.secrets_dir / "session.key"),
        )

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
        if not isinstance(username, str) or _USER_NAME.fullmatch(username) is None:
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
        matches = await self._password_work.run(verify_password, password, user.password_hash if user else None)
        if not matches or user is None or user.disabled:
            await self.ephemeral.add_failure(key, self.settings.login_window)
            await self.ephemeral.add_failure(account, self.settings.login_window)
            await self._audit("login_failed", username, username, {"client": client})
            raise Unauthenticated("invalid user name or password")
        await self.ephemeral.clear_failures(key)  # the account's count stays: other addresses' guesses remain
        cookie = secrets.token_urlsafe(32)  # always new: a session id chosen before sign-in is never reused
        now = time.time()
        await self.store.add_session(SessionRecord(digest(cookie), user.name, now, now + self.settings.session_ttl))
        await self._audit("login", user.name, user.name, {"client": client})
        return cookie, user

    async def logout(self, identity: Identity) -> None:
        if identity.session_hash:
            await self.store.delete_session(identity.session_hash)
            await self._audit("logout", identity.subject, identity.subject)

    # ------------------------------------------------------------------ users and tokens

    async def _audit(self, action: str, actor: str, target: str, detail: dict[str, Any] | None = None) -> None:
        await self.store.add_audit(AuditEvent(time.time(), action, actor, target, detail or {}))

    async def add_user(self, name: str, password: str, role: Role, actor: str, models: tuple[str, ...] = ()) -> User:
        validate_user_name(name)
        if len(password) < 8:
            raise BadRequest("passwords need at least 8 characters")
        _validate_globs(models)
        user = User(
            name, await self._password_work.run(hash_password, password), role, False, time.time(), tuple(models)
        )
        await self.store.add_user(user)
        await self._audit("user_added", actor, name, {"role": role, "models": list(models)})
        return user

    async def set_models(self, name: str, models: tuple[str, ...], actor: str) -> User:
        """The user's model allow-list (for the user and every token it owns); empty: every model."""
        _validate_globs(models)
        user = await self.store.update_user(name, models=tuple(models))
        self._cache.clear()
        await self._audit("user_models_changed", actor, name, {"models": list(models)})
        return user

    async def set_password(self, name: str, password: str, actor: str) -> None:
        if len(password) < 8:
            raise BadRequest("passwords need at least 8 characters")
        user = await self.store.update_user(name, password_hash=await self._password_work.run(hash_password, password))
        await self.store.delete_user_sessions(user.name)
        await self._audit("password_changed", actor, name)

    async def set_disabled(self, name: str, disabled: bool, actor: str) -> User:
        user = await self.store.update_user(name, disabled=disabled)
        if disabled:
            await self.store.delete_user_sessions(user.name)
        self._cache.clear()
        await self._audit("user_disabled" if disabled else "user_enabled", actor, name)
        return user

    async def ensure_first_admin(self) -> str | None:
        """With no users at all, create ``admin`` with a random password and return it (to print once)."""
        if await self.store.list_users():
            return None
        password = secrets.token_urlsafe(12)
        await self.add_user("admin", password, "admin", "first start")
        return password

    async def create_token(
        self,
        owner: str,
        name: str,
        scopes: list[str],
        models: list[str],
        expires: str | float | None,
        rpm: int | None,
        actor: str,
        creator: Identity | None = None,
    ) -> tuple[str, TokenRecord]:
        """Returns (the secret token, shown once; its record). A ``creator`` who is not an admin may make
        tokens only for itself and only with scopes it has; a creator that is a token bounds the new one by
        its own models, rate and expiry (controller/auth/bounds.py). The CLI passes none: it acts as the
        machine's administrator."""
        unknown = [scope for scope in scopes if scope not in {s.value for s in Scope}]
        if unknown or not scopes:
            raise BadRequest(f"scopes must be some of {[s.value for s in Scope]}")
        if creator is not None and not creator.is_admin:
            if owner.lower() != creator.subject.lower():
                raise Forbidden("you can create tokens only for yourself")
            beyond = [scope for scope in scopes if not creator.has(scope)]
            if beyond:
                raise Forbidden(f"you cannot give a token scopes you do not have: {', '.join(beyond)}")
        user = await self.store.get_user(owner)
        if user is None:
            raise NotFound(f"user '{owner}' not found")
        if Scope.ADMIN in scopes and user.role != "admin":
            raise BadRequest("only admins may own tokens with the admin scope")
        check_name(name)
        _validate_globs(tuple(models))
        seconds = expiry_seconds(expires)
        now = time.time()
        grant = Grant(tuple(models), check_rpm(rpm), now + seconds if seconds else None)
        if creator is not None and creator.token_id is not None:
            grant = within_maker(creator, grant, never=isinstance(expires, str) and seconds is None)
        token, token_id, secret_hash = new_token()
        record = TokenRecord(
            id=token_id,
            name=name,
            owner=user.name,  # as stored, whatever the case asked for
            secret_hash=secret_hash,
            scopes=tuple(sorted(set(scopes))),
            models=grant.models,
            expires_at=grant.expires_at,
            created_at=now,
            rpm=grant.rpm,
            made_by=creator.token_id if creator is not None else None,
        )
        await self.store.add_token(record)
        detail = {"name": name, "owner": user.name, "scopes": scopes, "made_by": record.made_by}
        await self._audit("token_created", actor, token_id, detail)
        return token, record

    async def tokens_for(self, viewer: Identity) -> list[TokenRecord]:
        """Every token for an admin; a user's own otherwise."""
        tokens = await self.store.list_tokens()
        return [t for t in tokens if viewer.is_admin or t.owner == viewer.subject]

    async def revoke_token(self, token_id: str, actor: str, by: Identity | None = None) -> TokenRecord:
        if by is not None and not by.is_admin:
            own = await self.store.get_token(token_id)
            if own is None or own.owner != by.subject:  # another user's token: as if it did not exist
                raise NotFound(f"token '{token_id}' not found")
        if not await self.store.revoke_token(token_id):
            raise NotFound(f"token '{token_id}' not found")
        self._cache.pop(token_id, None)
        await self._audit("token_revoked", actor, token_id)
        await self._revoke_made_by(token_id, actor)
        token = await self.store.get_token(token_id)
        assert token is not None
        return token

    async def _revoke_made_by(self, token_id: str, actor: str) -> None:
        """Revoke every token made, directly or in turn, with ``token_id``: a leaked token's children go with it."""
        tokens = await self.store.list_tokens()
        made: dict[str, list[TokenRecord]] = {}
        for token in tokens:
            if token.made_by:
                made.setdefault(token.made_by, []).append(token)
        pending = [token_id]
        while pending:
            for child in made.pop(pending.pop(), []):
                pending.append(child.id)
                if not child.revoked and await self.store.revoke_token(child.id):
                    self._cache.pop(child.id, None)
                    await self._audit("token_revoked", actor, child.id, {"made_by": child.made_by})


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
