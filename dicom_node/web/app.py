"""The WSGI application: a Werkzeug URL map, one handler per route.

A later service (e.g. DICOMweb under ``/dicomweb``) adds its rules to
:data:`NodeApp.url_map` and its handlers, or is mounted beside it; the
listener and its limits stay as they are.
"""

from __future__ import annotations

import json
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response

from dicom_node.monitoring.health import Health

__all__ = ["NodeApp"]

StartResponse = Callable[..., object]


class NodeApp:
    def __init__(self, registry: CollectorRegistry, health: Health) -> None:
        self.registry = registry
        self.health = health
        self.url_map = Map([
            Rule("/metrics", endpoint="metrics", methods=["GET"]),  # GET rules answer HEAD too
            Rule("/healthz", endpoint="healthz", methods=["GET"]),
        ], strict_slashes=False)
        self.handlers: dict[str, Callable[[Request], Response]] = {"metrics": self.metrics, "healthz": self.healthz}

    def metrics(self, request: Request) -> Response:
        """Prometheus text format (or OpenMetrics, when the scraper asks for it)."""
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return Response(encoder(self.registry), headers={"Content-Type": content_type,
                                                         "Cache-Control": "no-store"})

    def healthz(self, request: Request) -> Response:
        """200 when every check is ok, 503 otherwise; the body names each check."""
        report = self.health.report()
        return Response(json.dumps(report.as_json(), indent=1) + "\n", status=200 if report.ok else 503,
                        mimetype="application/json", headers={"Cache-Control": "no-store"})

    def __call__(self, environ: dict[str, object], start_response: StartResponse) -> Iterable[bytes]:
        request = Request(environ)
        try:
            endpoint, _args = self.url_map.bind_to_environ(environ).match()
            response: Response | HTTPException = self.handlers[str(endpoint)](request)
        except HTTPException as exc:  # 404, 405 (with Allow)
            response = exc
        return response(environ, start_response)  # type: ignore[arg-type]
