"""``gpu-broker``: serve, check a config, show the pool, manage tokens, and the admin commands
that talk to a running broker (drain/undrain, reset-slot, reload, usage).

Every user mistake (bad config path, broker down, bad token) prints one clear message to stderr
and exits 1; never a traceback. Usage errors exit 2 (argparse).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from broker.config.durations import format_duration
from gpu_kernel.errors import SharedGPUError


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except SharedGPUError as exc:
        print(f"gpu-broker: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `gpu-broker status | head`: the reader had enough
        with contextlib.suppress(OSError, ValueError, AttributeError):
            # the interpreter flushes stdout at exit: into nothing now, not into the pipe
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpu-broker", description="Shared GPU broker")
    sub = parser.add_subparsers(metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the broker")
    serve.add_argument("--config", required=True, metavar="FILE")
    serve.add_argument("--tick", type=float, default=1.0, help=argparse.SUPPRESS)
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check-config", help="check a config file")
    check.add_argument("file", metavar="FILE")
    check.set_defaults(func=cmd_check_config)

    status = sub.add_parser("status", help="show slots, leases and suspended kernels")
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    _remote_args(status)
    status.set_defaults(func=cmd_status)

    for name, helptext in (("drain", "no new leases on HOST"), ("undrain", "undo drain")):
        cmd = sub.add_parser(name, help=helptext + " (admin token; persisted)")
        cmd.add_argument("host", metavar="HOST")
        _remote_args(cmd)
        cmd.set_defaults(func=cmd_drain, drained=name == "drain")
    reset = sub.add_parser("reset-slot", help="free a slot stuck unreachable (admin token)")
    reset.add_argument("slot", metavar="SLOT_ID")
    _remote_args(reset)
    reset.set_defaults(func=cmd_reset_slot)
    reload = sub.add_parser("reload", help="make the broker load its config again (admin)")
    _remote_args(reload)
    reload.set_defaults(func=cmd_reload)
    usage = sub.add_parser("usage", help="GPU-hours, leases, suspends per user and group")
    usage.add_argument("--group", help="only this group (teachers: a group they teach)")
    usage.add_argument("--since", help='unix seconds, a date (2024-09-01) or "7d" back')
    usage.add_argument("--csv", action="store_true", help="CSV instead of a table")
    _remote_args(usage)
    usage.set_defaults(func=cmd_usage)

    token = sub.add_parser("token", help="create, list, revoke API tokens")
    tsub = token.add_subparsers(metavar="ACTION")
    create = tsub.add_parser("create", help="create a token (printed once)")
    create.add_argument("--config", required=True, metavar="FILE")
    create.add_argument("--user", required=True)
    create.add_argument("--role", choices=("user", "teacher", "admin"), default="user")
    create.add_argument(
        "--output",
        metavar="FILE",
        help="write the token to this new file (mode 0600; as root: owned by --user, who must "
        "be a Unix user here), or print it with -",
    )
    create.set_defaults(func=cmd_token_create)
    listing = tsub.add_parser("list", help="list tokens (ids and prefixes, never the tokens)")
    listing.add_argument("--config", required=True, metavar="FILE")
    listing.set_defaults(func=cmd_token_list)
    revoke = tsub.add_parser("revoke", help="revoke a token by id or prefix")
    revoke.add_argument("--config", required=True, metavar="FILE")
    revoke.add_argument("token", metavar="TOKEN_PREFIX_OR_ID")
    revoke.set_defaults(func=cmd_token_revoke)
    return parser


def _remote_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="broker URL (default: from --config)")
    parser.add_argument("--config", metavar="FILE", help="config file, for the URL")
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        help="token file (default: $SHARED_GPU_TOKEN, then ~/.config/jupyter-shared-gpu/token)",
    )


def _client(args: argparse.Namespace) -> Any:
    """A BrokerClient for --url / --config / $SHARED_GPU_BROKER_URL and the token."""
    from broker.client import BrokerClient, read_token

    if args.url:
        url = args.url
    elif args.config:
        server = _load(args.config).server
        host = "127.0.0.1" if server.host in ("0.0.0.0", "::", "") else server.host
        url = f"http://{host}:{server.port}"
    else:
        url = os.environ.get("SHARED_GPU_BROKER_URL", "http://127.0.0.1:8765")
    if args.token_file:
        token, source = read_token(env_var="", token_file=args.token_file)
    else:
        token, source = read_token()
    return BrokerClient(url, token, token_source=source)


def _load(path: str) -> Any:
    from broker.config.loader import load_config

    return load_config(path)


def _store(config_path: str) -> Any:
    from broker.store.sqlite import Store

    return Store(_load(config_path).server.database)


# -- commands ------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from broker.daemon import serve

    config = _load(args.config)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        serve(config, tick_interval=args.tick)
    except OSError as exc:
        where = f"{config.server.host}:{config.server.port}"
        print(
            f"gpu-broker: cannot listen on {where}: {exc.strerror or exc}\n"
            "  hint: another broker may be running; change [server] port in the config",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from broker.errors import ConfigError

    try:
        config = _load(args.file)
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue)
        return 1
    hosts, slots = _count(len(config.hosts), "host"), _count(len(config.slots), "slot")
    print(f"{args.file}: OK, {hosts}, {slots}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.status()
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    print(format_status(status))
    return 0


def format_status(status: dict[str, Any]) -> str:
    """The status table: one row per slot, then suspended kernels, then the queue."""
    now = float(status.get("now") or time.time())
    rows = [("HOST", "SLOT", "KIND", "USER", "STATE", "IDLE FOR", "LEASE AGE", "DEVICE")]
    for slot in status.get("slots", []):
        lease = slot.get("lease") or {}
        user = lease.get("user") or ("(other)" if lease else "-")
        if not lease:
            idle = "-"
        elif lease.get("busy"):
            idle = "busy"
        else:
            idle = _age(now, lease.get("last_activity") or lease.get("granted_at"))
        rows.append(
            (
                str(slot.get("host")),
                str(slot.get("id")),
                str(slot.get("kind")),
                user,
                str(slot.get("state")),
                idle,
                _age(now, lease.get("granted_at")),
                str(slot.get("device")),
            )
        )
    lines = _table(rows)
    checkpoints = status.get("checkpoints") or []
    if checkpoints:
        lines += ["", f"suspended kernels: {len(checkpoints)}"]
        ck_rows = [("HOST", "KERNEL", "USER", "CHECKPOINT", "SUSPENDED FOR")]
        for ck in checkpoints:
            ck_rows.append(
                (
                    str(ck.get("host")),
                    str(ck.get("kernel_id")),
                    str(ck.get("user")),
                    format_bytes(int(ck.get("bytes") or 0)),
                    _age(now, ck.get("created_at")),
                )
            )
        lines += ["  " + line for line in _table(ck_rows)]
    queue = status.get("queue", [])
    lines.append("")
    lines.append(f"queue: {len(queue)} waiting")
    for entry in queue:
        who = entry.get("user") or "(other)"
        waited = _age(now, entry.get("created_at"))
        lines.append(f"  {entry.get('position')}. {who} wants {entry.get('kind')} ({waited})")
    return "\n".join(lines)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def format_bytes(size: int) -> str:
    """1536 -> "1.5 KiB"."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def cmd_drain(args: argparse.Namespace) -> int:
    with _client(args) as client:
        reply = client.drain(args.host, args.drained)
    states = ", ".join(f"{s['id']} {s['state']}" for s in reply.get("slots", []))
    word = "drained" if reply.get("drained") else "undrained"
    print(f"host {reply.get('host')} {word} ({states})")
    return 0


def cmd_reset_slot(args: argparse.Namespace) -> int:
    with _client(args) as client:
        reply = client.reset_slot(args.slot)
    print(f"slot {reply.get('slot')}: {reply.get('state')}")
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    from broker.errors import BrokerRequestError

    with _client(args) as client:
        try:
            reply = client.reload()
        except BrokerRequestError as exc:
            if exc.code != "bad_config":
                raise
            print(f"gpu-broker: {exc.message}", file=sys.stderr)
            return 1
    hosts, slots = _count(reply.get("hosts", 0), "host"), _count(reply.get("slots", 0), "slot")
    print(f"reloaded {reply.get('path')}: {hosts}, {slots}")
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    with _client(args) as client:
        report = client.usage(since=args.since, group=args.group, csv=args.csv)
    if args.csv:
        sys.stdout.write(report)
        return 0
    rows = [("USER", "GROUPS", "GPU-HOURS", "LEASES", "SUSPENDS")]
    for row in report.get("users", []):
        groups = ",".join(row.get("groups", [])) or "-"
        rows.append(
            (
                row["user"],
                groups,
                f"{row['gpu_hours']:.2f}",
                str(row["leases"]),
                str(row["suspends"]),
            )
        )
    lines = _table(rows)
    if report.get("groups"):
        grows = [("GROUP", "MEMBERS", "ACTIVE", "GPU-HOURS", "LEASES", "SUSPENDS")]
        for row in report["groups"]:
            grows.append(
                (
                    row["group"],
                    str(row["members"]),
                    str(row["active"]),
                    f"{row['gpu_hours']:.2f}",
                    str(row["leases"]),
                    str(row["suspends"]),
                )
            )
        lines += ["", *_table(grows)]
    print("\n".join(lines))
    return 0


def _age(now: float, since: float | None) -> str:
    if since is None:
        return "-"
    return format_duration(max(0, round(now - since)))


def cmd_token_create(args: argparse.Namespace) -> int:
    from broker.http.auth import create_token
    from broker.token_file import check_output, write_token_file

    output = None if args.output in (None, "-") else Path(args.output).expanduser()
    if output is not None:
        check_output(output, args.user)  # before the token exists: a refusal leaves nothing
    store = _store(args.config)
    try:
        token, row = create_token(store, args.user, args.role)
    finally:
        store.close()
    if args.output == "-":
        print(token)
        print(f"token {row.id} for {row.user} ({row.role})", file=sys.stderr)
    elif output is not None:
        owner = write_token_file(output, token + "\n", args.user)
        print(
            f"token {row.id} ({row.prefix}...) for {row.user} ({row.role}) written to "
            f"{output} (mode 0600, owned by {owner})"
        )
    else:
        print(token)
        print(
            f"token {row.id} for {row.user} ({row.role}): shown once, keep it in "
            "$SHARED_GPU_TOKEN or ~/.config/jupyter-shared-gpu/token (chmod 600)",
            file=sys.stderr,
        )
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    from broker.http.auth import list_tokens

    store = _store(args.config)
    try:
        rows = list_tokens(store)
    finally:
        store.close()
    table = [("ID", "PREFIX", "USER", "ROLE", "CREATED", "REVOKED")]
    for row in rows:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(row.created_at))
        revoked = "yes" if row.revoked else "no"
        table.append((row.id, row.prefix + "...", row.user, row.role, created, revoked))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    from broker.http.auth import revoke_token

    store = _store(args.config)
    try:
        row = revoke_token(store, args.token)
    finally:
        store.close()
    print(f"revoked token {row.id} ({row.prefix}...) of {row.user}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


def _count(n: int, noun: str) -> str:
    """ "1 host", "3 hosts"."""
    return f"{n} {noun}" + ("" if n == 1 else "s")
