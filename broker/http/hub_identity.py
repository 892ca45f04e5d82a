"""Hub users as the broker's identities, and hub groups as its classes, with a cache.

The API's authentication (``broker.http.calls.authenticate``, the hot calls of
``broker.http.routes`` and the ``tornado.web`` handlers) asks ``HubIdentities`` about any bearer
token that is not a broker token (``sgpu_...``) when the config has ``[identity] jupyterhub``:

- **Who**: ``GET /hub/api/user`` with the token (``broker.http.hub_api``), cached by the token's
  sha256 for ``cache_time``; a token the hub does not know is remembered as unknown for a few
  seconds. Concurrent misses of one token share one hub call. While the hub is down, cached
  identities keep working until their cache time ends; a new one gets 503 "cannot reach
  JupyterHub at URL".
- **Role**: a hub admin is a broker admin; a user who teaches a group (``teachers`` or
  ``teacher_hub_group``) is a teacher; everyone else a user. The token must carry the scope
  ``access:services!service=NAME`` (as JupyterHub's own services require).
- **Classes**: the users of each ``hub_group``/``teacher_hub_group`` are fetched with the
  service's token and handed to the service (``BrokerService.set_hub_members``), which applies
  them to the scheduler's groups: a lease request waits for a fetch that started after it
  arrived (concurrent requests share it), so a change in the hub counts from the next request,
  with no reload. A periodic fetch every ``cache_time`` keeps quotas of running kernels current.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import tornado.ioloop

from broker.config.identity import HubConfig
from broker.http.hub_api import HubApi, HubError, HubUser, read_api_token
from broker.service.service import BrokerService
from gpu_kernel.protocol import USER_NAME_RE

log = logging.getLogger("broker.hub")

BROKER_TOKEN_PREFIX = "sgpu_"
UNKNOWN_TOKEN_TIME = 5.0  # seconds a token the hub does not know is answered 401 from memory
MAX_CACHED = 100_000  # cached tokens; past it, expired entries go, then the oldest
RETRY_GROUPS = 5.0  # seconds before the hub groups are read again after a failed read
FRESH_WAIT = 4.0  # a lease request waits this long for the hub's groups when recent ones exist


@dataclass
class CacheStats:
    """Identity lookups since the broker started (``/metrics``, the bench)."""

    hits: int = 0
    misses: int = 0
    hub_calls: int = 0
    hub_failures: int = 0
    group_fetches: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


class HubIdentities:
    """Hub tokens to ``HubUser``s (cached) and hub groups to the service's classes. Lives on
    the broker's loop; ``BrokerServer`` makes one and starts it (it does nothing while the
    config names no hub)."""

    def __init__(self, service: BrokerService, clock: Callable[[], float] = time.monotonic) -> None:
        self.service = service
        self.clock = clock
        self.stats = CacheStats()
        self._api: HubApi | None = None
        self._api_for: HubConfig | None = None
        self._cache: dict[str, tuple[float, HubUser | None]] = {}
        self._lookups: dict[str, asyncio.Future[HubUser | None]] = {}
        self._groups_future: asyncio.Future[None] | None = None
        self._groups_started = 0.0
        self._groups_fetched_at: float | None = None  # start of the last fetch that worked
        self._timer: object | None = None  # the next background read of the hub groups
        self._stopped = True

    @property
    def enabled(self) -> bool:
        """Does the config name a hub? (Adding or removing one takes a restart to check the
        service token; until then its tokens are refused.)"""
        return self.service.config.identity.jupyterhub is not None

    @property
    def config(self) -> HubConfig:
        hub = self.service.config.identity.jupyterhub
        assert hub is not None, "HubIdentities needs [identity] jupyterhub"
        return hub

    @property
    def api(self) -> HubApi:
        """The hub client for the current config (made again after a reload changed it)."""
        if self._api is None or self._api_for != self.config:
            self._api = HubApi(self.config, read_api_token(self.config))
            self._api_for = self.config
        return self._api

    def start(self) -> None:
        """With a hub: check the service token now (a missing one fails the start, with the
        fix), fetch the classes' members, and again every ``cache_time``."""
        if not self.enabled:
            return
        _ = self.api
        self._stopped = False
        tornado.ioloop.IOLoop.current().add_callback(self._refresh_in_background)

    def stop(self) -> None:
        self._stopped = True
        if self._timer is not None:
            tornado.ioloop.IOLoop.current().remove_timeout(self._timer)
            self._timer = None

    # -- who -----------------------------------------------------------------------------------

    def is_hub_token(self, token: str) -> bool:
        """A token to ask the hub about: not a broker token, and a hub is configured."""
        return (
            bool(token)
            and not token.startswith(BROKER_TOKEN_PREFIX)
            and len(token) <= 200
            and self.enabled
        )

    def cached(self, token: str) -> tuple[bool, HubUser | None]:
        """(known, user) from the cache alone: known False means the hub must be asked."""
        entry = self._cache.get(token_digest(token))
        if entry is not None and entry[0] > self.clock():
            return True, entry[1]
        return False, None

    async def user(self, token: str) -> HubUser | None:
        """The hub's user for ``token`` (None: unknown to the hub), from the cache or the hub;
        concurrent lookups of one token share one call. HubUnreachable when the hub is down
        and the token is not cached."""
        known, user = self.cached(token)
        if known:
            return user
        digest = token_digest(token)
        pending = self._lookups.get(digest)
        if pending is None:
            pending = asyncio.ensure_future(self._look_up(digest, token))
            pending.add_done_callback(_seen)  # its caller may be gone (a client hung up)
            self._lookups[digest] = pending
        return await asyncio.shield(pending)

    async def _look_up(self, digest: str, token: str) -> HubUser | None:
        since = self.clock()
        try:
            self.stats.hub_calls += 1
            user = await self.api.user_for_token(token)
            if user is not None and self._groups_stale_for(user):
                await self.fresh_groups(since)
        except HubError:
            self.stats.hub_failures += 1
            raise
        finally:
            self._lookups.pop(digest, None)
        ttl = (
            self.config.cache_time
            if user is not None
            else min(UNKNOWN_TOKEN_TIME, self.config.cache_time)
        )
        self._remember(digest, self.clock() + ttl, user)
        return user

    def _remember(self, digest: str, expires: float, user: HubUser | None) -> None:
        if len(self._cache) >= MAX_CACHED:
            now = self.clock()
            for key in [k for k, (until, _) in self._cache.items() if until <= now]:
                del self._cache[key]
            while len(self._cache) >= MAX_CACHED:
                del self._cache[next(iter(self._cache))]
        self._cache[digest] = (expires, user)

    def forget(self, token: str) -> None:
        """Drop a token from the cache (the dashboard's sign-out)."""
        self._cache.pop(token_digest(token), None)

    def may_use_service(self, user: HubUser) -> bool:
        """Does the token carry ``access:services`` for this service?"""
        name = self.config.service_name
        return "access:services" in user.scopes or (
            f"access:services!service={name}" in user.scopes
        )

    def role_of(self, user: HubUser) -> str:
        """admin (a hub admin), teacher (teaches a group) or user."""
        if user.admin:
            return "admin"
        if any(user.name in group.teachers for group in self.service.config.groups):
            return "teacher"
        return "user"

    # -- classes -------------------------------------------------------------------------------

    def hub_group_names(self) -> set[str]:
        """The hub groups the config's ``[[groups]]`` name."""
        names: set[str] = set()
        if not self.enabled:
            return names
        for group in self.service.base_config.groups:
            names.update(n for n in (group.hub_group, group.teacher_hub_group) if n)
        return names

    def _groups_stale_for(self, user: HubUser) -> bool:
        """Does the hub list ``user`` in other configured hub groups than the broker knows?
        (Then the classes' members are fetched before the user is answered.)"""
        names = self.hub_group_names()
        members = self.service.hub_members
        known = {name for name in names if user.name in members.get(name, ())}
        return (user.groups & names) != known

    async def fresh_groups(self, since: float) -> None:
        """Return once the classes' members come from a fetch that started at ``since`` or
        later (``clock()`` time). A hub that is down, or slower than ``FRESH_WAIT``, does not
        hold the request up while members fetched within ``cache_time`` are known (they serve);
        without them, HubUnreachable."""
        if not self.hub_group_names():
            return
        while self._groups_fetched_at is None or self._groups_fetched_at < since:
            if self._groups_future is None:
                self._groups_started = self.clock()
                self._groups_future = asyncio.ensure_future(self._fetch_groups())
                # a caller that stopped waiting (FRESH_WAIT) leaves its failure to stats and logs
                self._groups_future.add_done_callback(_seen)
            started, future = self._groups_started, self._groups_future
            recent = self._recent_members()
            try:
                if recent:
                    await asyncio.wait_for(asyncio.shield(future), FRESH_WAIT)
                else:
                    await asyncio.shield(future)
            except asyncio.TimeoutError:
                if self._recent_members():
                    return
                continue  # they aged meanwhile: wait for this read in full
            except HubError:
                if self._recent_members():
                    return
                raise
            if started >= since:
                return

    def _recent_members(self) -> bool:
        """Were the classes' members fetched within ``cache_time``?"""
        fetched = self._groups_fetched_at
        return fetched is not None and self.clock() - fetched < self.config.cache_time

    async def _fetch_groups(self) -> None:
        started = self._groups_started
        try:
            names = sorted(self.hub_group_names())
            self.stats.group_fetches += 1
            try:
                found = await asyncio.gather(*(self.api.group_users(name) for name in names))
            except HubError:
                self.stats.hub_failures += 1
                raise
            members: dict[str, frozenset[str]] = {}
            for name, users in zip(names, found, strict=True):
                if users is None:
                    log.warning("JupyterHub has no group %r (named in the broker config)", name)
                    users = frozenset()
                bad = sorted(u for u in users if not USER_NAME_RE.fullmatch(u))
                if bad:
                    log.warning(
                        "hub group %r: %d user name(s) cannot be broker users and are left out: %s",
                        name,
                        len(bad),
                        ", ".join(repr(u[:40]) for u in bad[:5]),
                    )
                members[name] = frozenset(u for u in users if USER_NAME_RE.fullmatch(u))
            if self.service.set_hub_members(members):
                log.info("hub groups changed: %s", {k: len(v) for k, v in members.items()})
            self._groups_fetched_at = started
        finally:
            self._groups_future = None

    async def _refresh_in_background(self) -> None:
        """Read the hub groups now, and again ``cache_time`` later (the current config's)."""
        self._timer = None
        if self._stopped or not self.enabled:
            return
        delay = self.config.cache_time
        try:
            await self.fresh_groups(self.clock())
        except HubError as exc:
            log.warning("hub groups not refreshed: %s", exc)
            delay = min(delay, RETRY_GROUPS)  # e.g. the broker started before the hub
        if not self._stopped and self.enabled:
            loop = tornado.ioloop.IOLoop.current()
            self._timer = loop.call_later(delay, self._refresh_in_background)


@dataclass
class Lookup:
    """What the API knows of a token before it authenticates: ``user`` from memory, or
    ``wait`` to await first (a cache miss, or a lease request's fresh classes)."""

    user: HubUser | None = None
    wait: Awaitable[HubUser | None] | None = None


def look_up(hub: HubIdentities | None, token: str, fresh_groups: bool) -> Lookup:
    """Start what authenticating ``token`` needs; count the cache's hits and misses.
    ``fresh_groups``: a lease request, which must see the hub's groups as of now."""
    if hub is None or not hub.enabled:
        return Lookup()
    since = hub.clock()
    needs_groups = fresh_groups and bool(hub.hub_group_names())
    hub_token = hub.is_hub_token(token)
    known, user = hub.cached(token) if hub_token else (True, None)
    if hub_token:
        if known:
            hub.stats.hits += 1
        else:
            hub.stats.misses += 1
    if known and not needs_groups:
        return Lookup(user=user)

    async def wait() -> HubUser | None:
        if needs_groups:
            await hub.fresh_groups(since)
        return await hub.user(token) if hub_token else None

    return Lookup(wait=wait())


def _seen(task: asyncio.Future) -> None:
    """Mark a shared hub call's outcome as retrieved: its failure is counted and told to the
    callers still waiting, and must not come back as "Task exception was never retrieved"."""
    if not task.cancelled() and task.exception() is not None:
        log.debug("hub call failed: %s", task.exception())
