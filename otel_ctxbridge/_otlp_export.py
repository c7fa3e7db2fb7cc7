"""Exporter construction for configure(): console and OTLP (http/protobuf or gRPC) exporters.

:class:`_Export` turns ``configure()``'s arguments and the ``OTEL_*`` variables into the
exporters of each signal (``"traces"``, ``"logs"``): ``OTEL_TRACES_EXPORTER`` /
``OTEL_LOGS_EXPORTER`` choose them, and arguments win over ``OTEL_EXPORTER_OTLP_*`` (and their
per-signal variants). The OTLP exporter packages are optional extras, imported only when used.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from opentelemetry.sdk._logs.export import ConsoleLogRecordExporter
from opentelemetry.sdk.trace.export import ConsoleSpanExporter

from .errors import requires_extra

__all__ = ["DEFAULT_EXPORT_TIMEOUT"]

_logger = logging.getLogger("otel_ctxbridge")
DEFAULT_EXPORT_TIMEOUT = 2.0
"""Seconds an OTLP export (with its retries) may take when nothing else is configured."""


def _env(signal: str, name: str) -> str | None:
    return os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_{name}") or os.environ.get(
        f"OTEL_EXPORTER_OTLP_{name}"
    )


class _Export:
    """Which exporters a signal gets, from the arguments and the ``OTEL_*`` variables."""

    def __init__(
        self,
        otlp: bool,
        endpoint: str | None,
        protocol: str | None,
        headers: Mapping[str, str] | None,
        timeout: float | None,
    ) -> None:
        self.otlp = otlp
        self.endpoint = endpoint
        self.protocol = protocol
        self.headers = headers
        self.timeout = timeout

    def exporters(self, signal: str) -> list[Any]:
        """What ``OTEL_TRACES_EXPORTER``/``OTEL_LOGS_EXPORTER`` ask for (default: otlp)."""
        names = os.environ.get(f"OTEL_{signal.upper()}_EXPORTER", "otlp")
        out: list[Any] = []
        for name in sorted({n.strip().lower() for n in names.split(",")}):
            if name == "console":
                out.append(
                    ConsoleSpanExporter() if signal == "traces" else ConsoleLogRecordExporter()
                )
            elif name == "otlp" and self.otlp:
                out.append(self.otlp_exporter(signal))
            elif name not in ("none", "otlp", ""):
                _logger.warning(
                    "otel_ctxbridge: unsupported OTEL_%s_EXPORTER %r", signal.upper(), name
                )
        return out

    def otlp_exporter(self, signal: str) -> Any:
        """The OTLP exporter of ``signal`` (``"traces"`` or ``"logs"``)."""
        chosen = (self.protocol or _env(signal, "PROTOCOL") or "http/protobuf").strip().lower()
        timeout = self.timeout
        if timeout is None and _env(signal, "TIMEOUT") is None:
            timeout = DEFAULT_EXPORT_TIMEOUT
        kwargs: dict[str, Any] = {"timeout": timeout} if timeout is not None else {}
        if self.headers is not None:
            kwargs["headers"] = dict(self.headers)
        if chosen == "grpc":
            if self.endpoint is not None:
                kwargs["endpoint"] = self.endpoint
            return _grpc(signal, kwargs)
        if chosen != "http/protobuf":
            _logger.warning("otel_ctxbridge: OTLP protocol %r unsupported; using http", chosen)
        if self.endpoint is not None:
            path = "/v1/traces" if signal == "traces" else "/v1/logs"
            kwargs["endpoint"] = self.endpoint.rstrip("/") + path
        if signal == "traces":
            with requires_extra("otlp", "OTLP export over http/protobuf"):
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415 - optional extra
                    OTLPSpanExporter,
                )

            return OTLPSpanExporter(**kwargs)
        with requires_extra("otlp", "OTLP export over http/protobuf"):
            from opentelemetry.exporter.otlp.proto.http._log_exporter import (  # noqa: PLC0415 - optional extra
                OTLPLogExporter,
            )

        return OTLPLogExporter(**kwargs)


def _grpc(signal: str, kwargs: dict[str, Any]) -> Any:
    if signal == "traces":
        with requires_extra("otlp-grpc", "OTLP export over gRPC"):
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # noqa: PLC0415 - optional extra
                OTLPSpanExporter,
            )

        return OTLPSpanExporter(**kwargs)
    with requires_extra("otlp-grpc", "OTLP export over gRPC"):
        from opentelemetry.exporter.otlp.proto.grpc._log_exporter import (  # noqa: PLC0415 - optional extra
            OTLPLogExporter,
        )

    return OTLPLogExporter(**kwargs)
