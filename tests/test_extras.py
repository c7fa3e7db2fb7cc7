"""Features of optional extras fail with an install hint when their extra is missing."""

from __future__ import annotations

import importlib
import sys

import pytest

import otel_ctxbridge as cb


def _missing(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # an import of it now fails


def test_instrument_asgi_without_the_asgi_extra_names_the_install(
    monkeypatch: pytest.MonkeyPatch, bridge: cb.ContextBridge
) -> None:
    """instrument_asgi raises MissingExtraError (an ImportError) naming the pip install."""
    _missing(monkeypatch, "opentelemetry.instrumentation.asgi")
    with pytest.raises(cb.MissingExtraError, match=r"pip install 'otel_ctxbridge\[asgi\]'"):
        cb.instrument_asgi(lambda scope, receive, send: None, bridge)  # type: ignore[arg-type, return-value]


def test_http_egress_without_the_httpx_extra_names_the_install(
    monkeypatch: pytest.MonkeyPatch, bridge: cb.ContextBridge
) -> None:
    """instrument_http_clients says which extra brings the httpx instrumentation."""
    _missing(monkeypatch, "opentelemetry.instrumentation.httpx")
    with pytest.raises(ImportError, match=r"otel_ctxbridge\[httpx\]"):
        cb.instrument_http_clients(bridge, cb.EgressPolicy(hosts=["orders"]), requests=False)


def test_otlp_export_without_the_otlp_extra_names_the_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Building the OTLP exporter says which extra to install."""
    from otel_ctxbridge._otlp_export import _Export

    _missing(monkeypatch, "opentelemetry.exporter.otlp.proto.http.trace_exporter")
    export = _Export(True, "http://127.0.0.1:4318", "http/protobuf", None, 1.0)
    with pytest.raises(cb.MissingExtraError, match=r"otel_ctxbridge\[otlp\]"):
        export.otlp_exporter("traces")


@pytest.mark.parametrize(
    ("module", "missing", "extra"),
    [
        ("otel_ctxbridge.integrations.celery", "celery", "celery"),
        ("otel_ctxbridge.collector", "opentelemetry.proto", "collector"),
    ],
)
def test_modules_of_an_extra_name_the_install_when_it_is_missing(
    monkeypatch: pytest.MonkeyPatch, module: str, missing: str, extra: str
) -> None:
    """Importing the Celery integration or the embedded collector without their extra raises
    MissingExtraError naming the pip install (not a bare ModuleNotFoundError)."""
    for name in [m for m in sys.modules if m == module or m.startswith(f"{module}.")]:
        monkeypatch.delitem(sys.modules, name)
    if module == "otel_ctxbridge.collector":
        monkeypatch.delitem(sys.modules, "otel_ctxbridge.otlp_sink", raising=False)
    _missing(monkeypatch, missing, *[m for m in list(sys.modules) if m.startswith(f"{missing}.")])
    with pytest.raises(cb.MissingExtraError, match=rf"pip install 'otel_ctxbridge\[{extra}\]'"):
        importlib.import_module(module)
