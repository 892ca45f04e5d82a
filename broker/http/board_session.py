"""Dashboard sign-in sessions: a random cookie names a session kept in the broker's memory.

``broker.http.dashboard`` makes a session when someone signs in (a broker token typed once, or
the hub's OAuth) and reads it on every page. The cookie is HttpOnly, SameSite=Strict, and Secure
when the page came over https; it holds only a random id (the broker keeps its sha256). A session
keeps what proves the identity again on each page (a broker token's hash, or the hub's access
token), so a revoked token or a hub user who lost admin loses it at once. Each session has a
CSRF token that every form carries and every POST must return. A restart of the broker signs
everybody out (sessions live in memory).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

SESSION_COOKIE = "gpu_broker_session"
LOGIN_COOKIE = "gpu_broker_login"  # before sign-in: the form's CSRF token, the OAuth state
SESSION_TIME = 8 * 3600.0
LOGIN_TIME = 600.0
MAX_SESSIONS = 10_000


@dataclass(frozen=True)
class Session:
    """``kind`` "token": ``credential`` is a broker token's sha256; "hub": the hub's access
    token of the user (memory only)."""

    kind: str
    credential: str
    csrf: str
    expires: float


class Sessions:
    """The signed-in sessions of one broker, by the sha256 of their cookie."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._by_digest: dict[str, Session] = {}

    def create(self, kind: str, credential: str) -> tuple[str, Session]:
        """A new session; returns the cookie value (shown to the browser once) and it."""
        now = self.clock()
        if len(self._by_digest) >= MAX_SESSIONS:
            for key in [k for k, s in self._by_digest.items() if s.expires <= now]:
                del self._by_digest[key]
            while len(self._by_digest) >= MAX_SESSIONS:
                del self._by_digest[next(iter(self._by_digest))]
        cookie = secrets.token_urlsafe(32)
        session = Session(kind, credential, secrets.token_urlsafe(24), now + SESSION_TIME)
        self._by_digest[_digest(cookie)] = session
        return cookie, session

    def get(self, cookie: str | None) -> Session | None:
        if not cookie or len(cookie) > 100:
            return None
        key = _digest(cookie)
        session = self._by_digest.get(key)
        if session is not None and session.expires <= self.clock():
            del self._by_digest[key]
            return None
        return session

    def drop(self, cookie: str | None) -> None:
        if cookie:
            self._by_digest.pop(_digest(cookie), None)

    def __len__(self) -> int:
        return len(self._by_digest)


def same_token(given: str | None, expected: str) -> bool:
    """Constant-time comparison of a CSRF token or an OAuth state."""
    return bool(given) and hmac.compare_digest(given.encode(), expected.encode())


def _digest(cookie: str) -> str:
    return hashlib.sha256(cookie.encode()).hexdigest()
