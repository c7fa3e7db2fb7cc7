"""Egress policy: which destinations receive the context as W3C ``baggage``.

OpenTelemetry's httpx and requests instrumentations inject ``traceparent`` and ``baggage``
from the current context into every outbound request, whoever the destination. An
:class:`EgressPolicy` lists the destinations allowed to receive baggage (internal services);
every other host gets ``traceparent`` only, and optionally the request id header::

    policy = EgressPolicy(hosts=["orders", ".internal"], networks=["10.0.0.0/8"])
    egress = instrument_http_clients(bridge, policy)     # httpx (sync + async) and requests

How it is enforced: the instrumentations call a *request hook* inside the client span, right
before they inject. The hook (:meth:`HttpEgress.request_hook`) decides from the request's URL
and makes the context the instrumentation is about to inject from the one the policy allows:
without baggage for a host outside the policy (a ``baggage`` header already on the request,
say copied by a redirect, is removed too), with the request's late ``update()`` values for an
allowed one. The instrumentation stays the only writer of the headers, so nothing is injected
twice; the hook's context ends with the client span. Redirects: httpx runs the hook for every
hop; requests copies the first request's headers to each hop without the instrumentation, so
the hook also strips ``baggage`` before a hop to a host outside the policy. Host names are
compared as written in the URL, never resolved.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any
from urllib.parse import urljoin

from opentelemetry import propagate
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context, create_key
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from . import _runtime as rt
from ._foreign_baggage import baggage_prefixes
from .bridge import ContextBridge
from .egress_policy import EgressConfigError, EgressPolicy
from .errors import requires_extra
from .propagation import default_propagator

__all__ = ["EgressConfigError", "EgressPolicy", "HttpEgress", "instrument_http_clients"]

_logger = logging.getLogger("otel_ctxbridge")
_ORIGIN = create_key("otel_ctxbridge.egress_origin")
"""Context entry of a shaped client-span context: the context before the policy shaped it."""


class HttpEgress:
    """Applies an :class:`EgressPolicy` to OpenTelemetry's HTTP client instrumentations.

    :func:`instrument_http_clients` makes one and wires its hooks; use :meth:`request_hook`
    and :meth:`async_request_hook` yourself when you instrument the clients yourself, and
    :meth:`headers` for clients OpenTelemetry does not instrument.
    """

    def __init__(self, bridge: ContextBridge, policy: EgressPolicy) -> None:
        if policy.request_id_only_elsewhere:
            field = bridge.fields.get(policy.request_id_field)
            if field is None or field.header is None:
                raise EgressConfigError(
                    f"request_id_only_elsewhere needs a field {policy.request_id_field!r} "
                    "with a header"
                )
        self.bridge = bridge
        """The bridge whose fields travel."""
        self.policy = policy
        """The policy deciding which hosts get baggage."""
        self._undo: list[Any] = []
        self._warned = False

    # -- hooks -----------------------------------------------------------------------------

    def request_hook(self, span: object, request: Any) -> None:
        """The instrumentations' request hook (httpx ``RequestInfo`` or a requests
        ``PreparedRequest``): shapes the context the instrumentation injects next. Never raises."""
        try:
            self._shape(span, getattr(request, "url", None), getattr(request, "headers", None))
            hooks = getattr(request, "hooks", None)  # a requests PreparedRequest
            chain = hooks.get("response") if isinstance(hooks, dict) else None
            if isinstance(chain, list) and not any(
                isinstance(hook, _Redirects) and hook.egress is self for hook in chain
            ):
                chain.append(_Redirects(self))
        except Exception:  # telemetry never throws on the request path
            _logger.warning("otel_ctxbridge: egress hook failed", exc_info=True)

    def _redirect(self, response: Any, origin: Context) -> None:
        """requests follows a redirect with a copy of the request's headers, outside the
        instrumentation (no hook, no inject): strip ``baggage`` before a hop leaves the policy
        (and add the request id header in its place when the policy asks for it); add it,
        from ``origin`` (the context the request was sent in), to a hop back into it."""
        try:
            if not getattr(response, "is_redirect", False):
                return
            target = urljoin(str(response.url), str(response.headers.get("location", "")))
            headers = getattr(response.request, "headers", None)
            if not isinstance(headers, MutableMapping):
                return
            if not self.policy.allows(target):
                _drop_baggage(headers)
                if self.policy.request_id_only_elsewhere:
                    self._put_request_id(origin, headers)
            else:
                prefixes = _baggage_prefixes()
                if not any(_is_baggage(str(n), prefixes) for n in headers):  # as the first hop
                    carrier: dict[str, str] = {}
                    propagate.inject(carrier, self._with_late_updates(origin))
                    for name, value in carrier.items():
                        if _is_baggage(name, prefixes):
                            headers[name] = value
        except Exception:  # telemetry never throws on the request path
            _logger.warning("otel_ctxbridge: egress redirect hook failed", exc_info=True)

    async def async_request_hook(self, span: object, request: Any) -> None:
        """:meth:`request_hook` for ``httpx.AsyncClient`` (OpenTelemetry awaits it)."""
        self.request_hook(span, request)

    def _shape(self, span: object, url: object, headers: object) -> None:
        ctx = rt.get_current()
        allowed = self.policy.allows(url)
        if allowed:
            new = self._with_late_updates(ctx)
        else:
            if isinstance(headers, MutableMapping):
                _drop_baggage(headers)
            if self.policy.request_id_only_elsewhere:
                self._put_request_id(ctx, headers)
            new = rt.with_entry(ctx, rt.BAGGAGE_KEY, {}) if ctx.get(rt.BAGGAGE_KEY) else ctx
        if new is ctx:
            return
        if ctx.get(rt.SPAN_KEY) is not span:
            # The hook is not running inside the client span, so a context attached here
            # would outlive the request: refuse rather than leak it.
            if not self._warned:
                self._warned = True
                _logger.warning(
                    "otel_ctxbridge: the HTTP instrumentation called the request hook outside "
                    "its span; the egress policy cannot shape what it injects"
                )
            return
        # No detach on purpose: the instrumentation's ``start_as_current_span`` resets the
        # context variable to its value from before the span, which drops this one with it.
        # The context before shaping stays reachable for requests' redirects (see _Redirects).
        rt.attach(rt.with_entry(new, _ORIGIN, ctx))

    def _with_late_updates(self, ctx: Context) -> Context:
        bag: dict[str, object] = dict(ctx.get(rt.BAGGAGE_KEY) or {})  # type: ignore[call-overload]
        values = self.bridge.values_in(ctx)
        changed = False
        for name, field in self.bridge.fields.items():
            if not field.propagate:
                continue
            key = str(field.baggage_key)
            if name in values:
                if bag.get(key) != values[name]:
                    bag[key] = values[name]
                    changed = True
            elif key in bag:
                del bag[key]
                changed = True
        return rt.with_entry(ctx, rt.BAGGAGE_KEY, bag) if changed else ctx

    def _put_request_id(self, ctx: Context, headers: object) -> None:
        field = self.bridge.fields[self.policy.request_id_field]
        value = self.bridge.values_in(ctx).get(field.name)
        if (
            isinstance(headers, MutableMapping)
            and isinstance(value, str)
            and value.isascii()
            and value.isprintable()
        ):
            headers[str(field.header)] = value

    # -- manual use ------------------------------------------------------------------------

    def headers(
        self, url: object, carrier: MutableMapping[str, str] | None = None
    ) -> MutableMapping[str, str]:
        """``traceparent`` plus, when the policy allows ``url``, ``baggage`` for a client
        OpenTelemetry does not instrument; returns ``carrier`` (default: a new dict)."""
        out: MutableMapping[str, str] = {} if carrier is None else carrier
        if self.policy.allows(url):
            return self.bridge.inject(out)
        TraceContextTextMapPropagator().inject(out)
        _drop_baggage(out)
        if self.policy.request_id_only_elsewhere:
            self._put_request_id(rt.get_current(), out)
        return out

    def instrument_client(self, client: Any) -> None:
        """Instrument one ``httpx.Client`` or ``httpx.AsyncClient`` (any transport, such as
        ``httpx.MockTransport``) with this policy, instead of every client."""
        with requires_extra("httpx", "HttpEgress.instrument_client"):
            import httpx  # noqa: PLC0415 - optional extra
            from opentelemetry.instrumentation.httpx import (  # noqa: PLC0415 - optional extra
                HTTPXClientInstrumentor,
            )

        hook = self.async_request_hook if isinstance(client, httpx.AsyncClient) else None
        HTTPXClientInstrumentor.instrument_client(client, request_hook=hook or self.request_hook)
        self._undo.append(lambda: HTTPXClientInstrumentor.uninstrument_client(client))

    def uninstrument(self) -> None:
        """Undo what :func:`instrument_http_clients` and :meth:`instrument_client` did."""
        while self._undo:
            self._undo.pop()()


def _drop_baggage(headers: MutableMapping[str, Any]) -> None:
    """Remove ``baggage`` from outbound ``headers``, and the baggage headers of the other
    configured propagators (Jaeger's ``uberctx-*``, OpenTracing's ``ot-baggage-*``): a redirect
    copies what the first hop carried."""
    prefixes = _baggage_prefixes()
    for name in [n for n in headers if _is_baggage(str(n), prefixes)]:
        del headers[name]


def _baggage_prefixes() -> tuple[str, ...]:
    """:func:`~otel_ctxbridge._foreign_baggage.baggage_prefixes` as text (header names here
    are str)."""
    return tuple(p.decode("latin-1") for p in baggage_prefixes())


def _is_baggage(name: str, prefixes: tuple[str, ...]) -> bool:
    """True for ``baggage`` and the baggage headers of the other configured propagators
    (``prefixes``), in any case: a plain dict carrier keeps the caller's."""
    lowered = name.lower()
    return lowered == "baggage" or bool(prefixes and lowered.startswith(prefixes))


class _Redirects:
    """The response hook :meth:`HttpEgress.request_hook` adds to a requests request (its
    redirects share it): :meth:`HttpEgress._redirect` with the context the request is being
    sent in (before the policy shaped it), read when the response arrives, so a request sent
    again, from another thread or scope, uses its own."""

    __slots__ = ("egress",)

    def __init__(self, egress: HttpEgress) -> None:
        self.egress = egress

    def __call__(self, response: Any, *args: Any, **kwargs: Any) -> None:
        current = rt.get_current()
        origin = current.get(_ORIGIN)
        self.egress._redirect(response, origin if isinstance(origin, Context) else current)


def instrument_http_clients(
    bridge: ContextBridge,
    policy: EgressPolicy,
    *,
    httpx: bool = True,
    requests: bool = True,
    tracer_provider: Any = None,
) -> HttpEgress:
    """Instrument httpx (sync and async clients) and requests with OpenTelemetry, applying
    ``policy``: allowed hosts get ``traceparent`` and ``baggage``, others no baggage.

    Installs :func:`~otel_ctxbridge.default_propagator` as the global propagator when the
    application has not chosen one (OTel's default, no ``OTEL_PROPAGATORS``). Raises
    :class:`EgressConfigError` when a library is already instrumented without the policy.
    Returns the :class:`HttpEgress`; ``uninstrument()`` undoes it all.
    """
    egress = HttpEgress(bridge, policy)
    use_default_propagator_if_unset()
    try:
        if httpx:
            with requires_extra("httpx", "instrument_http_clients(httpx=True)"):
                from opentelemetry.instrumentation.httpx import (  # noqa: PLC0415 - optional extra
                    HTTPXClientInstrumentor,
                )

            _instrument(
                egress,
                HTTPXClientInstrumentor(),
                request_hook=egress.request_hook,
                async_request_hook=egress.async_request_hook,
                tracer_provider=tracer_provider,
            )
        if requests:
            with requires_extra("requests", "instrument_http_clients(requests=True)"):
                from opentelemetry.instrumentation.requests import (  # noqa: PLC0415 - optional
                    RequestsInstrumentor,
                )

            _instrument(
                egress,
                RequestsInstrumentor(),
                request_hook=egress.request_hook,
                tracer_provider=tracer_provider,
            )
    except BaseException:
        egress.uninstrument()
        raise
    return egress


_instrumented_by_us: set[type] = set()
"""The instrumentor classes (process-wide singletons) an :class:`HttpEgress` instrumented and
has not undone: a second :func:`instrument_http_clients` is told so, not that another tool did
it."""


def _instrument(egress: HttpEgress, instrumentor: Any, **kwargs: Any) -> None:
    kind = type(instrumentor)
    if instrumentor.is_instrumented_by_opentelemetry:
        if kind in _instrumented_by_us:
            raise EgressConfigError(
                f"{kind.__name__} is already instrumented by an earlier "
                "instrument_http_clients() call (one egress policy per process): call "
                "uninstrument() on the HttpEgress it returned before instrumenting again"
            )
        raise EgressConfigError(
            f"{kind.__name__} is already instrumented without the egress policy "
            "(so every host gets baggage); let instrument_http_clients() instrument it: under "
            "opentelemetry-instrument, set OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=httpx,requests"
        )
    instrumentor.instrument(**kwargs)
    _instrumented_by_us.add(kind)

    def undo() -> None:
        _instrumented_by_us.discard(kind)
        instrumentor.uninstrument()

    egress._undo.append(undo)


def use_default_propagator_if_unset() -> bool:
    """Install :func:`~otel_ctxbridge.default_propagator` globally when the global propagator
    is still OpenTelemetry's default; returns True when it did."""
    import os  # noqa: PLC0415 - once per instrumentation

    if os.environ.get("OTEL_PROPAGATORS"):
        return False
    current = propagate.get_global_textmap()
    inner = getattr(current, "_propagators", None)
    if type(current) is not CompositePropagator or not isinstance(inner, list):
        return False
    if [type(p) for p in inner] != [TraceContextTextMapPropagator, W3CBaggagePropagator]:
        return False
    propagate.set_global_textmap(default_propagator())
    return True
