"""What the broker's HTTP front (``broker.http.front``) holds every client to, and what all
connections of one server share: ``Connections`` counts them against the caps, lends them read
budget, gives them one read buffer, and logs refusals without flooding the log.

The limits are constants (the config file's ``[server]`` table has no room for them yet; tests
patch them). Each is answered with a JSON error before the connection closes:

| limit | answer |
|---|---|
| ``MAX_CONNECTIONS`` open in all, ``MAX_CONNECTIONS_PER_ADDRESS`` from one address | 503 |
| request line and headers over ``MAX_HEADER_BYTES`` | 431 |
| body over ``MAX_BODY_BYTES`` | 413 |
| headers not complete ``HEADER_TIMEOUT`` after the request's first byte | 408 |
| body not complete ``BODY_TIMEOUT`` after the headers, plus 1 s per ``BODY_MIN_RATE`` bytes | 408 |
| more than ``MAX_PIPELINED`` requests sent ahead of their replies | 429 |
| no request in flight for ``IDLE_TIMEOUT`` | close |
| replies over ``WRITE_HIGH_WATER`` left unread for ``SEND_TIMEOUT`` | close |

Memory: a connection is not read while its unsent replies are over ``WRITE_HIGH_WATER`` or
``MAX_QUEUED`` of its requests wait, and requests it holds beyond ``REQUEST_ALLOWANCE`` draw on
``READ_BUDGET``, shared by all: once that is spent, such connections are not read until others'
requests are answered (requests under the allowance, heartbeats among them, never wait). Per
connection the front holds its objects (about 4 KiB), requests up to ``REQUEST_ALLOWANCE`` plus
what one read parses into (at most ``MAX_PIPELINED`` small requests, about 19 KiB), and unsent
replies up to ``WRITE_HIGH_WATER`` plus the reply that crossed it; and ``READ_BUDGET`` in all:
about 40 KiB per connection of an unauthenticated client, 100 KiB of a user's (a 404 names a
64 KiB lease id back), docs/internals.md has the sums and the measurements.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Iterator
from typing import Any, Protocol


class HttpProtocol(Protocol):
    """What ``Connections`` needs of a connection (``broker.http.front.HttpProtocol``)."""

    context: Any  # its ``remote_ip`` is the client's address
    drawn: int  # bytes it has drawn from the shared read budget

    def fed(self) -> None: ...

log = logging.getLogger("broker.api")

__all__ = ["LISTEN_BACKLOG", "Connections"]

MAX_HEADER_BYTES = 64 * 1024  # request line and headers together
MAX_BODY_BYTES = 1024 * 1024  # every API body is a small JSON object
MAX_CONNECTIONS = 16_384  # 10,000 kernels keep one connection each for their heartbeats
MAX_CONNECTIONS_PER_ADDRESS = 4_096  # a Jupyter host's kernels all call from its address
LISTEN_BACKLOG = 4_096  # connections the kernel holds until accepted: a class clicks at once
HEADER_TIMEOUT = 5.0  # from a request's first byte to the end of its headers
BODY_TIMEOUT = 10.0  # from the end of the headers to the end of the body, plus ...
BODY_MIN_RATE = 8 * 1024  # ... one second per this many bytes of body received
IDLE_TIMEOUT = 60.0  # no request in flight (a kernel heartbeats every 10-15 s)
SEND_TIMEOUT = 60.0  # replies over WRITE_HIGH_WATER that the client does not read
WRITE_HIGH_WATER = 16 * 1024  # unsent reply bytes that stop a connection being answered/read
WRITE_LOW_WATER = 4 * 1024  # ... until they drain below this
MAX_QUEUED = 16  # pipelined requests read ahead before reading pauses
MAX_PIPELINED = 32  # requests waiting on one connection (parsed from one read); 429 past it
READ_SIZE = 4 * 1024  # bytes taken off a socket at a time
REQUEST_ALLOWANCE = 8 * 1024  # request bytes a connection may hold without the budget
READ_BUDGET = 16 * 1024 * 1024  # request bytes over the allowances, all connections together
REQUEST_OVERHEAD = 512  # bytes of Python objects per parsed request, on top of its bytes
HEADER_OVERHEAD = 160  # ... and per header
LINGER = 2.0  # seconds a refused connection drains what the client still sends, then closes
MAX_DRAIN = 256 * 1024  # ... or bytes, whichever comes first
MAX_LINGERING = 256  # connections refused at the door draining at once; past it: closed at once
FD_RESERVE = 1024  # open files kept for the store, SSH to the hosts, logs
LOG_EVERY = 10.0  # seconds between two log lines about refusals (each line counts the others)


class Connections:
    """The open connections of one ``BrokerServer`` (it makes one and gives it to each
    ``HttpProtocol``; ``stop()`` closes what this iterates over)."""

    def __init__(self) -> None:
        self.open: set[HttpProtocol] = set()
        self.lingering: set[HttpProtocol] = set()  # refused at the door, draining
        self.per_address: dict[str, int] = {}
        self.spent = 0  # READ_BUDGET in use
        self.starved: dict[HttpProtocol, None] = {}  # waiting for budget, oldest first
        self.buffer = memoryview(bytearray(READ_SIZE))  # each read is parsed before the next
        self.fd_ceiling = raise_open_files_limit()
        self.refusals = 0
        self.last_log = -LOG_EVERY

    def __iter__(self) -> Iterator[HttpProtocol]:
        return iter([*self.open, *self.lingering])

    def __len__(self) -> int:
        return len(self.open)

    def admit(self, protocol: HttpProtocol) -> str | None:
        """Count ``protocol`` in, or say why it may not be (then it is not counted)."""
        address = protocol.context.remote_ip
        cap = min(MAX_CONNECTIONS, self.fd_ceiling)
        if len(self.open) >= cap:
            return f"the broker has {len(self.open)} connections open, its limit; try again later"
        mine = self.per_address.get(address, 0)
        if mine >= MAX_CONNECTIONS_PER_ADDRESS:
            return (
                f"{address} has {mine} connections open, the limit for one address; "
                "close idle ones or try again later"
            )
        self.open.add(protocol)
        self.per_address[address] = mine + 1
        return None

    def forget(self, protocol: HttpProtocol) -> None:
        """``protocol``'s connection is gone: it counts no more and gives its budget back."""
        self.lingering.discard(protocol)
        if protocol in self.open:
            self.open.discard(protocol)
            address = protocol.context.remote_ip
            left = self.per_address.pop(address, 1) - 1
            if left > 0:
                self.per_address[address] = left
        self.starved.pop(protocol, None)
        self.settle(protocol, 0)

    def settle(self, protocol: HttpProtocol, held: int) -> bool:
        """``protocol`` holds ``held`` bytes of requests now: draw what is over its allowance
        from the budget; False if the budget is spent (then its ``fed()`` is called once there
        is room again)."""
        over = held - REQUEST_ALLOWANCE if held > REQUEST_ALLOWANCE else 0
        if over != protocol.drawn:
            shrunk = over < protocol.drawn
            self.spent += over - protocol.drawn
            protocol.drawn = over
            if shrunk and self.starved and self.spent < READ_BUDGET:
                self._wake()
        if over and self.spent > READ_BUDGET:
            self.starved[protocol] = None
            return False
        return True

    def _wake(self) -> None:
        """Read again from the connections that waited longest, a read's worth each while the
        budget lasts."""
        room = (READ_BUDGET - self.spent) // READ_SIZE + 1
        while self.starved and room > 0:
            protocol = next(iter(self.starved))
            del self.starved[protocol]
            protocol.fed()
            room -= 1

    def refused(self, address: str, what: str) -> None:
        """Log a refusal: the first of every ``LOG_EVERY`` seconds, with the count before it."""
        self.refusals += 1
        now = asyncio.get_running_loop().time()
        if now - self.last_log >= LOG_EVERY:
            more = self.refusals - 1
            log.info(
                "%s: %s%s", address, what, f" ({more} more since the last line)" if more else ""
            )
            self.last_log, self.refusals = now, 0


def raise_open_files_limit() -> int:
    """Raise this process's soft limit on open files to what ``MAX_CONNECTIONS`` needs (as far
    as the hard limit allows); return how many connections the limit leaves room for."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    spare = MAX_LINGERING + FD_RESERVE
    want = MAX_CONNECTIONS + spare
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    if soft < want:
        log.warning(
            "the open files limit (%d, hard %d) leaves room for %d connections, not %d: raise "
            "it (systemd: LimitNOFILE=%d; a shell: ulimit -n %d)",
            *(soft, hard, max(soft - spare, 0), MAX_CONNECTIONS, want, want),
        )
    return max(soft - spare, 0)
