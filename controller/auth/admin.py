"""Users and API tokens, changed by an admin (the API, the web page) or the command line, and the audit of it.

Checking credentials is controller/auth/authenticate.py's ``Authenticator``. A change here that alters what its
verify cache holds (a revocation, a disabled user, a new allow-list) empties the cache of this process's
authenticator; other processes see it within ``auth.token_cache_ttl``.
"""

from __future__ import annotations

import secrets
import time

from common.errors import BadRequest, Forbidden, NotFound
from common.names import validate_model_name
from controller.auth.accounts import audit, validate_user_name
from controller.auth.authenticate import Authenticator
from controller.auth.bounds import Grant, check_glob_count, check_name, check_rpm, expiry_seconds, within_maker
from controller.auth.identity import Identity, Scope
from controller.auth.password_work import PasswordWork
from controller.auth.secrets import hash_password, new_token
from controller.store.base import Role, Store, TokenRecord, User

# The first admin's password, kept in the data dir (mode 0600) from the first start until it is changed.
INITIAL_PASSWORD_FILE = "initial-admin-password"  # noqa: S105 - a file name


def _validate_globs(globs: tuple[str, ...]) -> None:
    check_glob_count(globs)
    for glob in globs:
        validate_model_name(glob.replace("*", "x").replace("?", "x"))


class Administration:
    """Owns changing users and tokens: adding users, their passwords, model allow-lists and disabling them, the
    first admin; making, listing and revoking API tokens with the rules of who may make what (scopes, and a
    token's bounds by the token making it: controller/auth/bounds.py); the audit event of each change."""

    def __init__(self, store: Store, authenticator: Authenticator | None = None) -> None:
        """``authenticator``: the one that serves requests in this process, whose verify cache a change empties
        and whose bound on password work this shares; none where no requests are served (the command line:
        a server sees its changes within ``auth.token_cache_ttl``, as another replica's)."""
        self.store = store
        self._authenticator = authenticator
        self._password_work = authenticator.password_work if authenticator is not None else PasswordWork()

    def _forget(self, token_id: str | None = None) -> None:
        if self._authenticator is not None:
            self._authenticator.forget(token_id)

    # ------------------------------------------------------------------ users

    async def add_user(self, name: str, password: str, role: Role, actor: str, models: tuple[str, ...] = ()) -> User:
        validate_user_name(name)
        if len(password) < 8:
            raise BadRequest("passwords need at least 8 characters")
        _validate_globs(models)
        user = User(
            name, await self._password_work.run(hash_password, password), role, False, time.time(), tuple(models)
        )
        await self.store.add_user(user)
        await audit(self.store, "user_added", actor, name, {"role": role, "models": list(models)})
        return user

    async def set_models(self, name: str, models: tuple[str, ...], actor: str) -> User:
        """The user's model allow-list (for the user and every token it owns); empty: every model."""
        _validate_globs(models)
        user = await self.store.update_user(name, models=tuple(models))
        self._forget()
        await audit(self.store, "user_models_changed", actor, name, {"models": list(models)})
        return user

    async def set_password(self, name: str, password: str, actor: str) -> None:
        if len(password) < 8:
            raise BadRequest("passwords need at least 8 characters")
        user = await self.store.update_user(name, password_hash=await self._password_work.run(hash_password, password))
        await self.store.delete_user_sessions(user.name)
        await audit(self.store, "password_changed", actor, name)

    async def set_disabled(self, name: str, disabled: bool, actor: str) -> User:
        user = await self.store.update_user(name, disabled=disabled)
        if disabled:
            await self.store.delete_user_sessions(user.name)
        self._forget()
        await audit(self.store, "user_disabled" if disabled else "user_enabled", actor, name)
        return user

    async def ensure_first_admin(self) -> str | None:
        """With no users at all, create ``admin`` with a random password and return it (to print once)."""
        if await self.store.list_users():
            return None
        password = secrets.token_urlsafe(12)
        await self.add_user("admin", password, "admin", "first start")
        return password

    # ------------------------------------------------------------------ tokens

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
        await audit(self.store, "token_created", actor, token_id, detail)
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
        self._forget(token_id)
        await audit(self.store, "token_revoked", actor, token_id)
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
                    self._forget(child.id)
                    await audit(self.store, "token_revoked", actor, child.id, {"made_by": child.made_by})
