"""Loading the config for a running broker: probe ``gpus = "auto"`` hosts, and reload the file
without dropping a lease.

``gpu-broker serve`` (``broker.daemon``) calls ``load_for_serve``; SIGHUP and ``POST
/api/v1/admin/reload`` (``broker.http.admin``) call ``reload_config``: a bad file is rejected, each
problem logged, and the old config stays.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from broker.config.loader import Config, load_config
from broker.errors import ConfigError
from broker.hosts.discovery import discover_slots
from broker.service.service import BrokerService

log = logging.getLogger("broker")


def resolve_auto_hosts(config: Config) -> Config:
    """Probe ``gpus = "auto"`` hosts (``broker.hosts.discovery``) and fill in their slots."""
    for host in config.hosts:
        if host.auto_gpus:
            slots = discover_slots(host)
            config = config.with_slots(host.name, slots)
    return config


def load_for_serve(path: str | Path) -> Config:
    """Read, check and complete (auto hosts probed) the config; raises ConfigError and, for a
    host that cannot be probed, SharedGPUError."""
    return resolve_auto_hosts(load_config(path))


async def reload_config(service: BrokerService) -> Config:
    """Load the service's config file again (in a thread: probing may use SSH) and swap it in.
    A bad file raises ConfigError, each issue is logged, and the old config stays."""
    loop = asyncio.get_running_loop()
    try:
        config = await loop.run_in_executor(None, load_for_serve, service.config.path)
    except ConfigError as exc:
        log.error("reload rejected, the old config stays: %d problem(s)", len(exc.issues))
        for issue in exc.issues:
            log.error("  %s", issue)
        raise
    service.reconfigure(config)
    log.info(
        "config reloaded from %s: %d hosts, %d slots",
        config.path,
        len(config.hosts),
        len(config.slots),
    )
    return config
