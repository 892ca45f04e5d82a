"""The IPython kernel that runs on a GPU host: ``python -m gpu_kernel kernel -f CONNFILE``.

Started by ``launcher.start_kernel`` in its own session. ``GPUKernelApp`` binds 127.0.0.1 only,
whatever the connection file says, and writes ``exit_code`` next to the connection file when it
exits (cleanly, by ``sys.exit``, or by SIGTERM), so ``ctl status`` can report it. Later issues add
control messages (status, suspend) to ``GPUKernel``.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from pathlib import Path
from typing import Any

from ipykernel.ipkernel import IPythonKernel
from ipykernel.kernelapp import IPKernelApp
from traitlets import Type, validate

from gpu_kernel import __version__

LOOPBACK = "127.0.0.1"


class GPUKernel(IPythonKernel):
    """An IPython kernel; the place for shared-GPU control messages (status, suspend)."""

    implementation = "gpu_kernel"
    implementation_version = __version__


class GPUKernelApp(IPKernelApp):
    """``IPKernelApp`` with ``GPUKernel`` that never binds anything but the loopback address."""

    name = "gpu-kernel"
    kernel_class = Type(GPUKernel, klass="ipykernel.kernelbase.Kernel").tag(config=True)

    @validate("ip")
    def _loopback_only(self, proposal: dict[str, Any]) -> str:
        if proposal["value"] != LOOPBACK:
            self.log.warning(
                "ignoring ip %r: a shared-GPU kernel binds %s only", proposal["value"], LOOPBACK
            )
        return LOOPBACK

    @validate("transport")
    def _tcp_only(self, proposal: dict[str, Any]) -> str:
        return "tcp"


def _write_exit_code(connection_file: str, code: int) -> None:
    with contextlib.suppress(OSError):
        (Path(connection_file).parent / "exit_code").write_text(f"{code}\n")


def _exit_status(code: object) -> int:
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


def run(connection_file: str, argv: list[str] | None = None) -> int:
    """Run the kernel until it shuts down; returns its exit status (``__main__`` calls this)."""

    def on_sigterm(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    app = GPUKernelApp.instance()
    code = 1
    try:
        app.initialize(["-f", connection_file, *(argv or [])])
        app.start()
        code = 0
    except SystemExit as e:
        code = _exit_status(e.code)
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
    finally:
        _write_exit_code(connection_file, code)
        sys.stdout.flush()
    return code
