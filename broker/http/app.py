"""The broker's whole HTTP API: the hot lease calls (``broker.http.routes``) in front of the
``tornado.web`` application of the other endpoints (``http.handlers``, ``http.admin``).

``BrokerServer`` (``broker.daemon``) serves ``make_router(service)``; tests and the bench may serve
``make_app(service)`` alone (every call through ``tornado.web``).
"""

from __future__ import annotations

import tornado.web

from broker.http.admin import routes as admin_routes
from broker.http.dashboard import routes as dashboard_routes
from broker.http.handlers import (
    HeartbeatHandler,
    LeaseHandler,
    LeasesHandler,
    NotFoundHandler,
    StatusHandler,
    WhoamiHandler,
    log_request,
)
from broker.http.hub_identity import HubIdentities
from broker.http.routes import ApiRouter
from broker.service.service import BrokerService


def make_router(service: BrokerService, hub: HubIdentities | None = None) -> ApiRouter:
    """The whole API as ``BrokerServer`` serves it: hot lease calls on the fast path. ``hub``:
    the hub's identities, when the config names one (``[identity] jupyterhub``)."""
    return ApiRouter(service, make_app(service, hub), hub)


def make_app(
    service: BrokerService, hub: HubIdentities | None = None
) -> tornado.web.Application:
    args = {"service": service, "hub": hub}
    return tornado.web.Application(
        [
            (r"/api/v1/leases", LeasesHandler, args),
            (r"/api/v1/leases/([^/]+)", LeaseHandler, args),
            (r"/api/v1/leases/([^/]+)/heartbeat", HeartbeatHandler, args),
            (r"/api/v1/status", StatusHandler, args),
            (r"/api/v1/whoami", WhoamiHandler, args),
            *admin_routes(args),
            *dashboard_routes(args),
        ],
        default_handler_class=NotFoundHandler,
        default_handler_args=args,
        log_function=log_request,
    )
