"""``python -m gpu_kernel fence``: the fencing account's forced command on a GPU host.

The broker never logs in as a kernel's user. An admin gives it one account per host (the fencing
account) whose ``authorized_keys`` line for the broker's key forces this command::

    restrict,command="/opt/shared-gpu/bin/python -m gpu_kernel fence" ssh-ed25519 AAAA... broker

Whatever the client asks, sshd runs this, with the request in ``SSH_ORIGINAL_COMMAND``; it
accepts exactly one of::

    fence HOST KERNEL_ID OWNER GRACE   ask the kernel to save (SAVE_SIGNAL), wait up to GRACE s
                                       for it to exit, kill what is left; its runtime dir stays
    cleanup HOST KERNEL_ID OWNER       kill the kernel and remove its runtime dir (checkpoint too)
    status HOST KERNEL_ID OWNER        is it alive, its exit code
    probe                              the host's GPUs (``python -m gpu_kernel probe``)

and refuses anything else: a shell, another command, a pty, forwarding (``restrict``). Every word
is checked (``check_host_name``, ``check_kernel_id``, ``check_user_name``, GRACE 0-600 s). The
kernel is looked for only under ``<runtime_root>/<HOST>/<KERNEL_ID>`` and touched only when its
``launch.json`` names OWNER and the directory belongs to the Unix user acting.

Who acts: when the fencing account is root (sshd ``PermitRootLogin forced-commands-only``), this
command becomes OWNER's Unix user (supplementary groups too) before it reads anything, and refuses
root and system accounts (uid below ``--min-uid``, default 1000): a stolen broker key can then do
to each user's kernels only what that user could, and nothing else. Any other account acts as
itself: the account that runs the kernels (a shared service account), with the fencing key in
its ``authorized_keys`` and the same forced command. ``--as-self`` makes root act as itself too
(root runs the kernels; the broker's own "local" hosts).

Output: one JSON line, ``{"ok": true, "found": bool, "alive": bool, "exit_code": int|null,
"checkpoint": {"path", "bytes"}|null}`` (``found`` false: no runtime dir, nothing ran there), or
``{"ok": false, "code", "error", "hint"}`` with exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import sys

from gpu_kernel import launcher
from gpu_kernel.errors import BadRequest
from gpu_kernel.protocol import check_host_name, check_kernel_id, check_user_name

VERBS = ("fence", "cleanup", "status", "probe")
MAX_GRACE = 600.0
MIN_UID = 1000


class Refused(BadRequest):
    """A request the fencing command will not carry out; ``code`` says which kind."""

    def __init__(self, code: str, message: str, hint: str = "") -> None:
        super().__init__(message, hint)
        self.code = code


def parse_words(words: list[str]) -> tuple[str, list[str]]:
    """The verb and its checked arguments (see the module's docstring); Refused otherwise."""
    if not words:
        raise Refused(
            "no_command",
            "this key may only fence kernels: no shell, no other command",
            "send one of: fence HOST KERNEL_ID OWNER GRACE, cleanup HOST KERNEL_ID OWNER, "
            "status HOST KERNEL_ID OWNER, probe",
        )
    verb, args = words[0], words[1:]
    if verb not in VERBS:
        raise Refused(
            "unknown_command",
            f"refused {verb[:40]!r}: this key may only run fence, cleanup, status or probe",
        )
    need = {"fence": 4, "cleanup": 3, "status": 3, "probe": 0}[verb]
    if len(args) != need:
        raise Refused("bad_request", f"{verb} takes {need} words, got {len(args)}")
    if verb == "probe":
        return verb, []
    check_host_name(args[0])
    check_kernel_id(args[1])
    check_user_name(args[2])
    if verb == "fence":
        try:
            grace = float(args[3])
        except ValueError:
            grace = -1.0
        if not 0 <= grace <= MAX_GRACE:
            raise Refused(
                "bad_request", f"GRACE must be 0 to {MAX_GRACE:g} seconds, got {args[3]!r}"
            )
    return verb, args


def become(owner: str, min_uid: int) -> None:
    """Act as ``owner``'s Unix user from now on (this process runs as root)."""
    try:
        entry = pwd.getpwnam(owner)
    except KeyError:
        raise Refused(
            "no_such_user",
            f"there is no Unix user {owner!r} on this host",
            "kernels that run under a shared service account need the fencing key in that "
            "account (the same forced command), not in root's",
        ) from None
    if entry.pw_uid == 0 or entry.pw_uid < min_uid:
        raise Refused(
            "system_user",
            f"refused to act as {owner!r} (uid {entry.pw_uid}): root and system accounts "
            f"(uid below {min_uid}) run no kernels",
        )
    os.initgroups(owner, entry.pw_gid)
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    if os.geteuid() != entry.pw_uid or os.getegid() != entry.pw_gid:
        raise Refused("privileges", f"could not become {owner!r}")
    os.environ["HOME"] = entry.pw_dir
    os.environ["USER"] = os.environ["LOGNAME"] = owner


def act(verb: str, args: list[str], root: str | None) -> dict:
    """Carry out a checked request as the current Unix user."""
    host, kernel_id, owner = args[0], args[1], args[2]
    rdir = launcher.runtime_dir(root, host, kernel_id)
    if not rdir.exists() and not rdir.is_symlink():
        return {"ok": True, "found": False, "alive": False, "exit_code": None, "checkpoint": None}
    info = rdir.lstat()
    if rdir.is_symlink() or not rdir.is_dir() or info.st_uid != os.geteuid():
        raise Refused("not_owner", f"{rdir} is not a directory of this Unix user: left alone", "")
    record = launcher.launch_record(rdir) or {}
    if record.get("owner") != owner or record.get("kernel_id") != kernel_id:
        raise Refused(
            "not_owner",
            f"kernel {kernel_id} on {host} does not belong to {owner!r}: left alone",
            "the broker names the user who leased the kernel; its launch.json names another",
        )
    if verb == "fence":
        result = launcher.fence(rdir, float(args[3]))
        return {"ok": True, "found": True, **result}
    status = launcher.ctl_main(kernel_id, verb, None, root, host)
    return {"ok": True, "found": True, **json.loads(status.to_json()), "checkpoint": None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpu_kernel fence", description=__doc__)
    parser.add_argument("--runtime-root", default=None, help="default: as the launcher's")
    parser.add_argument("--min-uid", type=int, default=MIN_UID)
    parser.add_argument("--as-self", action="store_true", help="root does not change user")
    parser.add_argument("words", nargs="*", help="the request (else $SSH_ORIGINAL_COMMAND)")
    options = parser.parse_args(argv)
    words = options.words or os.environ.get("SSH_ORIGINAL_COMMAND", "").split()
    try:
        verb, args = parse_words(words)
        if verb == "probe":
            from gpu_kernel.probe import main as probe_main

            return probe_main()
        if os.geteuid() == 0 and not options.as_self:
            become(args[2], options.min_uid)
        reply = act(verb, args, options.runtime_root)
    except BadRequest as e:
        print(json.dumps({"ok": False, "code": e.code, "error": e.message, "hint": e.hint}))
        return 1
    except OSError as e:
        print(json.dumps({"ok": False, "code": "os_error", "error": str(e), "hint": ""}))
        return 1
    print(json.dumps(reply, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
