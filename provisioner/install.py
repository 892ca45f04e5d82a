"""``jupyter shared-gpu``: install or remove the "Shared GPU" kernelspec.

The kernelspec names our provisioner (entry point ``shared-gpu-provisioner``) and carries the broker
URL, the slot kind and where to find the token; never the token itself. Its logo (the launcher
card's) is ``provisioner/logo/``: the SVG is drawn by hand, the PNG is that SVG rendered by
headless Chromium (``chromium --headless --default-background-color=00000000 --window-size=64,64
--screenshot=logo-64x64.png logo-svg.svg``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

from gpu_kernel.errors import SharedGPUError
from provisioner.settings import DEFAULT_TOKEN_ENV, DEFAULT_TOKEN_FILE, ProvisionerSettings

PROVISIONER_NAME = "shared-gpu-provisioner"
LOGOS = tuple(Path(__file__).parent / "logo" / name for name in ("logo-svg.svg", "logo-64x64.png"))


def kernelspec(display_name: str, config: dict) -> dict:
    """The kernel.json for a Shared GPU kernel (``argv`` is what runs on the GPU host)."""
    return {
        "argv": ["python", "-m", "gpu_kernel", "kernel", "-f", "{connection_file}"],
        "display_name": display_name,
        "language": "python",
        "interrupt_mode": "signal",
        "metadata": {
            "kernel_provisioner": {"provisioner_name": PROVISIONER_NAME, "config": config},
            "debugger": False,
        },
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jupyter shared-gpu",
        description="Manage the 'Shared GPU' kernelspec: kernels that run on a GPU leased from a "
        "gpu-broker, over SSH.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    inst = sub.add_parser(
        "install",
        help="write the kernelspec",
        description="Write a kernelspec whose kernels take a GPU slot from the broker.",
    )
    inst.add_argument(
        "--broker-url", required=True, help="the broker's URL, e.g. http://127.0.0.1:8765"
    )
    inst.add_argument("--name", default="shared-gpu", help="kernelspec name (default: shared-gpu)")
    inst.add_argument(
        "--display-name", default="Shared GPU", help='name in the launcher (default: "Shared GPU")'
    )
    inst.add_argument(
        "--slot-kind",
        default="any",
        help='slot kind to lease, e.g. "a100" or "mig-1g.10gb" (default: any)',
    )
    inst.add_argument(
        "--token-env",
        default=DEFAULT_TOKEN_ENV,
        help=f"environment variable that holds the broker token (default: {DEFAULT_TOKEN_ENV})",
    )
    inst.add_argument(
        "--token-file",
        default=DEFAULT_TOKEN_FILE,
        help=f"file with the broker token, used when the variable is unset; must be mode 0600 "
        f"(default: {DEFAULT_TOKEN_FILE})",
    )
    inst.add_argument(
        "--lease-timeout", default="10m", help='how long to wait for a free slot (default: "10m")'
    )
    inst.add_argument(
        "--launch-timeout",
        default="60s",
        help='how long SSH connect + kernel start may take (default: "60s")',
    )
    inst.add_argument(
        "--orphan-grace",
        default="120s",
        help="a kernel that hears nothing from this Jupyter server for this long saves its "
        'state and exits, freeing its GPU (default: "120s")',
    )
    inst.add_argument(
        "--attach",
        choices=["lazy", "eager"],
        default="lazy",
        help="lazy: a new kernel holds no GPU until its first cell runs (opening a notebook "
        "takes none); eager: take the GPU when the kernel starts (default: lazy)",
    )
    inst.add_argument(
        "--link-timeout",
        default="10s",
        help="no word from the GPU host for this long means the SSH connection is lost: "
        'reconnect (default: "10s")',
    )
    inst.add_argument(
        "--warm",
        default="30m",
        help="keep a warm interpreter (Python, IPython and --warm-preload imported, no GPU "
        "touched) on each host a kernel ran on, for this long unused, so the next start or "
        'resume there skips those imports; "0" turns it off (default: "30m")',
    )
    inst.add_argument(
        "--warm-preload",
        action="append",
        metavar="MODULE",
        help='a module the warm interpreter imports beforehand (repeat it; default: torch; '
        '"" for none)',
    )
    inst.add_argument(
        "--ssh-key-file", help="SSH key to use instead of the one the broker's config names"
    )
    inst.add_argument(
        "--known-hosts-file", help="known_hosts to check GPU hosts against instead of the broker's"
    )
    where = inst.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="install for the current user")
    where.add_argument(
        "--sys-prefix", action="store_true", help="install into sys.prefix (e.g. the venv)"
    )
    where.add_argument("--prefix", help="install under this prefix")
    rm = sub.add_parser("uninstall", help="remove the kernelspec")
    rm.add_argument("--name", default="shared-gpu", help="kernelspec name (default: shared-gpu)")
    return parser


def _config_from(args: argparse.Namespace) -> dict:
    config = {
        "broker_url": args.broker_url,
        "slot_kind": args.slot_kind,
        "token_env": args.token_env,
        "token_file": args.token_file,
        "lease_timeout": args.lease_timeout,
        "launch_timeout": args.launch_timeout,
        "orphan_grace": args.orphan_grace,
        "attach": args.attach,
        "link_timeout": args.link_timeout,
        "warm": args.warm,
    }
    if args.warm_preload is not None:
        config["warm_preload"] = [name for name in args.warm_preload if name]
    if args.ssh_key_file:
        config["ssh_key_file"] = args.ssh_key_file
    if args.known_hosts_file:
        config["known_hosts_file"] = args.known_hosts_file
    ProvisionerSettings.from_config(config, args.display_name)  # refuse to write a bad spec
    return config


def install(args: argparse.Namespace) -> str:
    """Write the kernelspec; return the folder it went to."""
    spec = kernelspec(args.display_name, _config_from(args))
    prefix = sys.prefix if args.sys_prefix else args.prefix
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "kernel.json").write_text(json.dumps(spec, indent=2) + "\n")
        for logo in LOGOS:
            shutil.copyfile(logo, Path(tmp) / logo.name)
        return KernelSpecManager().install_kernel_spec(
            tmp, args.name, user=args.user, prefix=prefix
        )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``jupyter-shared-gpu`` (so ``jupyter shared-gpu ...`` works)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "install":
            dest = install(args)
            print(f"Installed kernelspec {args.name!r} ({args.display_name}) in {dest}")
        else:
            KernelSpecManager().remove_kernel_spec(args.name)
            print(f"Removed kernelspec {args.name!r}")
    except SharedGPUError as err:
        print(f"jupyter shared-gpu: {err}", file=sys.stderr)
        return 2
    except NoSuchKernel:
        print(f"jupyter shared-gpu: no kernelspec named {args.name!r}", file=sys.stderr)
        return 1
    except PermissionError as err:
        print(
            f"jupyter shared-gpu: cannot write {err.filename}: permission denied\n"
            "  hint: use --user, --sys-prefix or --prefix DIR",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
