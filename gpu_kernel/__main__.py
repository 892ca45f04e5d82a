"""Command line of the GPU-host side; ``remote.py`` runs these over SSH.

python -m gpu_kernel launch                       # LaunchRequest line on stdin (waits 600 s)
python -m gpu_kernel ctl KERNEL_ID status|kill|cleanup|signal N --host NAME [--runtime-root DIR]
python -m gpu_kernel ctl KERNEL_ID export-checkpoint|import-checkpoint --host NAME   # tar stream
python -m gpu_kernel ctl KERNEL_ID watch --host NAME   # a status line a second until it ends
python -m gpu_kernel ctl KERNEL_ID fence --host NAME [--grace S]   # save (SAVE_SIGNAL), then kill
python -m gpu_kernel fence [--as-self]            # the fencing account's forced command (fence.py)
python -m gpu_kernel warm --host-dir DIR --owner USER [--idle S] [--preload MOD]  # warm.py
python -m gpu_kernel probe                        # GPUs and MIG devices (NVML), one JSON line
python -m gpu_kernel kernel -f CONNFILE           # the kernel itself (the launcher runs it)
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import sys

from gpu_kernel.errors import BadRequest
from gpu_kernel.protocol import LAUNCH_AHEAD_WAIT, LaunchReply


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gpu_kernel", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("launch", help="start a kernel from one JSON request line on stdin")
    ctl = sub.add_parser("ctl", help="status, signal, kill or clean up a launched kernel")
    ctl.add_argument("kernel_id")
    ctl.add_argument(
        "action",
        choices=[
            "status",
            "signal",
            "kill",
            "fence",
            "cleanup",
            "watch",
            "export-checkpoint",
            "import-checkpoint",
        ],
    )
    ctl.add_argument("signum", nargs="?", type=int, help="signal number (for `signal`)")
    ctl.add_argument(
        "--host",
        required=True,
        help="the broker's name of this host (runtime dirs are <root>/<host>/<kernel_id>)",
    )
    ctl.add_argument(
        "--grace", type=float, default=30.0, help="fence: seconds the kernel has to save itself"
    )
    ctl.add_argument(
        "--runtime-root",
        default=None,
        help="default: $SHARED_GPU_RUNTIME_ROOT or ~/.local/share/jupyter-shared-gpu/kernels",
    )
    sub.add_parser("probe", help="list GPUs and MIG devices (NVML) as one JSON line")
    warm = sub.add_parser("warm", help="a warm interpreter for one user (the launcher starts it)")
    warm.add_argument("--host-dir", required=True, help="<runtime root>/<host name>")
    warm.add_argument("--owner", required=True, help="the broker user it serves")
    warm.add_argument("--idle", type=float, default=1800.0, help="exit after this long unused")
    warm.add_argument("--preload", action="append", default=[], help="a module to import")
    kernel = sub.add_parser("kernel", help="run the IPython kernel (started by `launch`)")
    kernel.add_argument("-f", dest="connection_file", required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["fence"]:  # the fencing account's forced command: its own strict parser
        from gpu_kernel.fence import main as fence_main

        return fence_main(argv[1:])
    args, rest = _parser().parse_known_args(argv)
    if args.command == "kernel":
        from gpu_kernel.kernelapp import run

        code = run(args.connection_file, rest)
        # The exit code is written and the atexit handlers run (IPython saves its history);
        # the rest of the interpreter's teardown is skipped, as a warm interpreter's fork
        # skips it: with torch loaded it takes ~0.7 s, and the slot is held until the
        # process is gone (a suspend's release waits for it).
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if rest:
        _parser().error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "warm":
        from gpu_kernel.warm import main as warm_main

        return warm_main(args.host_dir, args.owner, args.idle, args.preload)
    if args.command == "probe":
        from gpu_kernel.probe import main as probe_main

        return probe_main()
    from gpu_kernel import launcher

    if args.command == "ctl" and args.action.endswith("-checkpoint"):
        return _checkpoint_stream(args.kernel_id, args.action, args.runtime_root, args.host)

    if args.command == "launch":
        line = launcher.request_line(sys.stdin.buffer, LAUNCH_AHEAD_WAIT)
        if not line:  # started ahead, and no request came: nothing to do
            return 0
        reply, status, started = launcher.launch_main(line)
        print(reply.to_json(), flush=True)
        if started is not None and started.watch:
            return launcher.watch(started.rdir, sys.stdout.buffer, started.proc)
        return status
    if args.action == "watch":
        try:
            rdir = launcher.runtime_dir(args.runtime_root, args.host, args.kernel_id)
        except BadRequest as e:
            print(LaunchReply.failure(e.code, e.message, e.hint).to_json(), flush=True)
            return 1
        return launcher.watch(rdir, sys.stdout.buffer)
    try:
        if args.action == "fence":
            rdir = launcher.runtime_dir(args.runtime_root, args.host, args.kernel_id)
            print(json.dumps(launcher.fence(rdir, args.grace)), flush=True)
            return 0
        if args.action == "signal" and args.signum is None:
            raise BadRequest("`signal` needs a signal number", "e.g. `ctl KERNEL_ID signal 2`")
        result = launcher.ctl_main(
            args.kernel_id, args.action, args.signum, args.runtime_root, args.host
        )
    except BadRequest as e:
        print(LaunchReply.failure(e.code, e.message, e.hint).to_json(), flush=True)
        return 1
    print(result.to_json(), flush=True)
    return 0


def _checkpoint_stream(kernel_id: str, action: str, root: str | None, host: str) -> int:
    """export-checkpoint: tar on stdout (errors on stderr); import-checkpoint: tar on stdin."""
    from gpu_kernel import launcher, transfer

    try:
        rdir = launcher.runtime_dir(root, host, kernel_id)
        if action == "export-checkpoint":
            transfer.export_checkpoint(rdir, sys.stdout.buffer)
            return 0
        result = transfer.import_checkpoint(rdir, sys.stdin.buffer)
    except BadRequest as e:
        line = LaunchReply.failure(e.code, e.message, e.hint).to_json()
        print(line, file=sys.stderr if action == "export-checkpoint" else sys.stdout, flush=True)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
