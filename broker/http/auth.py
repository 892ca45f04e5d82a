"""Bearer tokens: who is calling the broker, and in which role.

A token is ``"sgpu_" + secrets.token_urlsafe(32)``. The broker stores only its sha256 hash, the
user, the role ("user" or "admin"), when it was made and whether it is revoked; plus an id (the
first 12 hex digits of the hash) and a display prefix (the first 9 characters, ~24 bits of the
token's 256) so an admin can tell tokens apart and revoke one. ``gpu-broker token create|list|
revoke`` call ``create_token``/``list_tokens``/``revoke_token``; the API calls ``verify`` on
every request and ``may_see`` to decide whose leases, checkpoints and usage a caller may read.

Roles: a **user** reads and acts on their own leases only; a **teacher** also reads (never acts
on) the leases, checkpoints and usage of the members of the groups they teach (``[[groups]]``
``teachers`` in the config); an **admin** reads and acts on everything.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from broker.errors import BrokerError
from broker.store.sqlite import Store, TokenRow
from gpu_kernel.protocol import USER_NAME_RE

TOKEN_PREFIX = "sgpu_"
ROLES = ("user", "teacher", "admin")
_DISPLAY = len(TOKEN_PREFIX) + 4


@dataclass(frozen=True)
class Identity:
    """Who a valid token speaks for."""

    user: str
    role: str
    token_id: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def is_teacher(self) -> bool:
        return self.role == "teacher"


def groups_of(config: object) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """(name, members, teachers) of every group in the config (``Config.groups``, if any)."""
    raw = getattr(config, "groups", None) or ()
    items = raw.values() if isinstance(raw, dict) else raw
    out = []
    for group in items:
        name = str(getattr(group, "name", ""))
        members = tuple(sorted(getattr(group, "members", ()) or ()))
        teachers = tuple(sorted(getattr(group, "teachers", ()) or ()))
        out.append((name, members, teachers))
    return out


def taught_groups(config: object, who: Identity) -> dict[str, tuple[str, ...]]:
    """Group name -> members, for the groups ``who`` teaches (a teacher token is needed)."""
    if not who.is_teacher:
        return {}
    return {name: members for name, members, teachers in groups_of(config) if who.user in teachers}


def may_see(config: object, who: Identity, user: str) -> bool:
    """May ``who`` read the leases, checkpoints and usage of ``user``?"""
    if who.is_admin or who.user == user:
        return True
    return any(user in members for members in taught_groups(config, who).values())


def may_act(who: Identity, user: str) -> bool:
    """May ``who`` release, heartbeat or forget what belongs to ``user``? (Teachers only read.)"""
    return who.is_admin or who.user == user


class TokenError(BrokerError):
    """A token command could not do what was asked (unknown or ambiguous token, bad role)."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def create_token(store: Store, user: str, role: str = "user") -> tuple[str, TokenRow]:
    """Make a token for ``user``; return it (shown once, never stored) and its stored row."""
    if role not in ROLES:
        raise TokenError(f"unknown role {role!r}", hint="use --role user, teacher or admin")
    if not USER_NAME_RE.fullmatch(user):
        raise TokenError(
            f"bad user name {user!r}: the broker's users are POSIX login names (they own "
            "kernels and name directories on the GPU hosts)",
            hint="give the Jupyter user's login name: 1 to 32 of A-Z a-z 0-9 _ . - , starting "
            "with a letter or _",
        )
    token = new_token()
    digest = hash_token(token)
    row = TokenRow(
        id=digest[:12],
        hash=digest,
        prefix=token[:_DISPLAY],
        user=user,
        role=role,
        created_at=time.time(),
        revoked=False,
    )
    store.add_token(row)
    return token, row


def verify(store: Store, token: str | None) -> Identity | None:
    """The identity behind ``token``, or None when it is missing, unknown or revoked. The API
    calls it on every request; ``Store.token_by_hash`` answers known hashes from memory until a
    token is created or revoked (by this broker or by the CLI's own connection)."""
    if not token or not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        return None
    digest = hash_token(token)
    row = store.token_by_hash(digest)
    # The lookup is by hash (an attacker cannot steer it); compare again in constant time anyway.
    if row is None or not hmac.compare_digest(row.hash, digest) or row.revoked:
        return None
    return Identity(user=row.user, role=row.role, token_id=row.id)


def list_tokens(store: Store) -> list[TokenRow]:
    return store.tokens()


def revoke_token(store: Store, prefix_or_id: str) -> TokenRow:
    """Revoke the one token whose id or display prefix is ``prefix_or_id``."""
    needle = prefix_or_id.strip()
    if not needle:
        raise TokenError("no token given", hint="pass a token id or prefix from `token list`")
    if needle.startswith(TOKEN_PREFIX) and len(needle) > _DISPLAY:
        # A whole token was pasted: match it by hash, never store or print it.
        matches = [row for row in store.tokens() if row.hash == hash_token(needle)]
    else:
        matches = [row for row in store.tokens() if needle in (row.id, row.prefix)]
        if not matches:
            matches = [row for row in store.tokens() if row.id.startswith(needle)]
    if not matches:
        raise TokenError(
            f"no token matches {needle!r}", hint="`gpu-broker token list` shows ids and prefixes"
        )
    if len(matches) > 1:
        ids = ", ".join(row.id for row in matches)
        raise TokenError(f"{needle!r} matches {len(matches)} tokens ({ids})", hint="use the id")
    store.revoke_tokens([matches[0].id], time.time())
    return matches[0]
