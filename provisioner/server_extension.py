"""The Jupyter server extension: each Shared GPU kernel's state, for the JupyterLab extension.

Enabled automatically when the package is installed (the wheel ships
``etc/jupyter/jupyter_server_config.d/jupyter_shared_gpu.json``). Routes, under the server's
base URL, authenticated, authorized as "kernels" and XSRF-checked by jupyter_server's own
handler machinery:

- ``GET  shared-gpu/kernels``              ``{"kernels": [ui_state, ...]}``, this server's
  Shared GPU kernels (what ``SharedGPUProvisioner.ui_state()`` returns)
- ``GET  shared-gpu/kernels/<id>``         one kernel's ``ui_state``; 404 for any other id
- ``POST shared-gpu/kernels/<id>/suspend`` "Suspend now": 202 and the ``ui_state`` at once;
  the suspend runs in the background and a refusal shows in ``message``

The provisioners are read in-process from the server's kernel manager: the broker's token never
reaches the browser, and a request never waits on the broker or a GPU host.
"""

from __future__ import annotations

import json
from typing import Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web

from provisioner.provisioner import SharedGPUProvisioner

KERNEL_ID = r"(?P<kernel_id>[A-Za-z0-9._-]{1,64})"


def shared_gpu_provisioners(kernel_manager: Any) -> dict[str, SharedGPUProvisioner]:
    """Kernel id -> provisioner, for every kernel of ``kernel_manager`` (a jupyter_client
    ``MultiKernelManager``) that runs on a Shared GPU."""
    found: dict[str, SharedGPUProvisioner] = {}
    for kernel_id in list(kernel_manager.list_kernel_ids()):
        try:
            km = kernel_manager.get_kernel(kernel_id)
        except (KeyError, web.HTTPError):
            continue  # shut down meanwhile
        provisioner = getattr(km, "provisioner", None)
        if isinstance(provisioner, SharedGPUProvisioner):
            found[kernel_id] = provisioner
    return found


class _SharedGPUHandler(APIHandler):  # type: ignore[misc]
    auth_resource = "kernels"

    def _provisioner(self, kernel_id: str) -> SharedGPUProvisioner:
        provisioner = shared_gpu_provisioners(self.kernel_manager).get(kernel_id)
        if provisioner is None:
            raise web.HTTPError(404, f"no Shared GPU kernel with id {kernel_id}")
        return provisioner

    def _reply(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(data))


class KernelsHandler(_SharedGPUHandler):
    @web.authenticated
    @authorized
    def get(self) -> None:
        provisioners = shared_gpu_provisioners(self.kernel_manager)
        self._reply({"kernels": [p.ui_state() for p in provisioners.values()]})


class KernelHandler(_SharedGPUHandler):
    @web.authenticated
    @authorized
    def get(self, kernel_id: str) -> None:
        self._reply(self._provisioner(kernel_id).ui_state())


class SuspendHandler(_SharedGPUHandler):
    @web.authenticated
    @authorized
    def post(self, kernel_id: str) -> None:
        provisioner = self._provisioner(kernel_id)
        provisioner.request_suspend()
        self._reply(provisioner.ui_state(), status=202)


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "provisioner.server_extension"}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    base = url_path_join(serverapp.web_app.settings["base_url"], "shared-gpu", "kernels")
    serverapp.web_app.add_handlers(
        ".*$",
        [
            (base, KernelsHandler),
            (url_path_join(base, KERNEL_ID), KernelHandler),
            (url_path_join(base, KERNEL_ID, "suspend"), SuspendHandler),
        ],
    )
    serverapp.log.info("Shared GPU: JupyterLab status endpoints at %s", base)
