"""Command line of the GPU-host side; ``remote.py`` runs these over SSH.

python -m gpu_kernel launch                       # LaunchRequest line on stdin
python -m gpu_kernel ctl KERNEL_ID status|kill|cleanup|signal N [--runtime-root DIR]
python -m gpu_kernel kernel -f CONNFILE           # the kernel itself (the launcher runs it)
"""

from __future__ import annotations

import argparse
import sys

from gpu_kernel.errors import BadRequest
from gpu_kernel.protocol import LaunchReply


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gpu_kernel", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("launch", help="start a kernel from one JSON request line on stdin")
    ctl = sub.add_parser("ctl", help="status, signal, kill or clean up a launched kernel")
    ctl.add_argument("kernel_id")
    ctl.add_argument("action", choices=["status", "signal", "kill", "cleanup"])
    ctl.add_argument("signum", nargs="?", type=int, help="signal number (for `signal`)")
    ctl.add_argument(
        "--runtime-root",
        default=None,
        help="default: $SHARED_GPU_RUNTIME_ROOT or ~/.local/share/jupyter-shared-gpu/kernels",
    )
    kernel = sub.add_parser("kernel", help="run the IPython kernel (started by `launch`)")
    kernel.add_argument("-f", dest="connection_file", required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    args, rest = _parser().parse_known_args(argv)
    if args.command == "kernel":
        from gpu_kernel.kernelapp import run

        return run(args.connection_file, rest)
    if rest:
        _parser().error(f"unrecognized arguments: {' '.join(rest)}")
    from gpu_kernel import launcher

    if args.command == "launch":
        reply, status = launcher.launch_main(sys.stdin.buffer.readline(1 << 20))
        print(reply.to_json(), flush=True)
        return status
    try:
        if args.action == "signal" and args.signum is None:
            raise BadRequest("`signal` needs a signal number", "e.g. `ctl KERNEL_ID signal 2`")
        result = launcher.ctl_main(args.kernel_id, args.action, args.signum, args.runtime_root)
    except BadRequest as e:
        print(LaunchReply.failure(e.code, e.message, e.hint).to_json(), flush=True)
        return 1
    print(result.to_json(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
