"""Core store: get, current, scope entry, AsyncLocalStorage.run and memory per request."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import tracemalloc
from collections.abc import Callable, Coroutine
from typing import Any

from opentelemetry import baggage
from opentelemetry import context as otel_context

import otel_ctxbridge as cb

from ._timing import interleaved

Row = tuple[str, float, float]
VALUES = {
    "request_id": "5f0c6a6e-8d6b-4a58-9f73-0c2f1d8e6b11",
    "tenant_id": "acme",
    "user_id": "u-42",
}


def _bridge() -> cb.ContextBridge:
    return cb.ContextBridge([cb.Field(name) for name in VALUES])


def _raw_scope() -> None:
    ctx = baggage.set_baggage("request_id", VALUES["request_id"])
    ctx = baggage.set_baggage("tenant_id", VALUES["tenant_id"], ctx)
    ctx = baggage.set_baggage("user_id", VALUES["user_id"], ctx)
    otel_context.detach(otel_context.attach(ctx))


def _row(label: str, ours: float, anchor: float, target: float) -> Row:
    print(f"    {label}: {ours:.0f} ns vs {anchor:.0f} ns")
    return (label, ours / anchor, target)


def timings() -> list[Row]:
    """Time the store API against raw OTel baggage and a plain ContextVar."""
    bridge = _bridge()
    rows: list[Row] = []
    with bridge.scope(**VALUES):
        got, anchor = interleaved(
            lambda: bridge.get("tenant_id"), lambda: baggage.get_baggage("tenant_id")
        )
        rows.append(_row("bridge.get / baggage.get_baggage", got, anchor, 0.5))
        cur, anchor = interleaved(bridge.current, baggage.get_all)
        rows.append(_row("bridge.current / baggage.get_all", cur, anchor, 0.5))

    def enter_exit() -> None:
        # Keyword arguments as users write them, each value looked up as _raw_scope does
        # (``**VALUES`` would add the interpreter's dict unpacking to the scope's cost).
        with bridge.scope(
            request_id=VALUES["request_id"],
            tenant_id=VALUES["tenant_id"],
            user_id=VALUES["user_id"],
        ):
            pass

    entered, anchor = interleaved(enter_exit, _raw_scope, number=5_000)
    rows.append(_row("3-field scope enter+exit / raw OTel", entered, anchor, 0.5))

    als: cb.AsyncLocalStorage[dict[str, str]] = cb.AsyncLocalStorage()
    var: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("v", default=None)

    def plain_run(store: dict[str, str], fn: Callable[[], object]) -> object:
        token = var.set(store)
        try:
            return fn()
        finally:
            var.reset(token)

    def noop() -> None:
        return None

    ran, anchor = interleaved(lambda: als.run(VALUES, noop), lambda: plain_run(VALUES, noop))
    rows.append(_row("AsyncLocalStorage.run / dict-in-ContextVar run", ran, anchor, 2.0))
    return rows


def _bytes_per_request(make: Callable[[asyncio.Event], Coroutine[Any, Any, None]], n: int) -> float:
    async def main() -> float:
        release = asyncio.Event()
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        tasks = [asyncio.create_task(make(release)) for _ in range(n)]
        await asyncio.sleep(0.05)
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        release.set()
        await asyncio.gather(*tasks)
        return sum(s.size_diff for s in after.compare_to(before, "filename")) / n

    return asyncio.run(main())


def memory() -> list[Row]:
    """Bytes per in-flight request holding 3 values, beyond a task holding nothing."""
    bridge = _bridge()
    n = 5_000

    async def bare(release: asyncio.Event) -> None:
        await release.wait()

    async def raw(release: asyncio.Event) -> None:
        ctx = baggage.set_baggage("request_id", cb.new_request_id())
        ctx = baggage.set_baggage("tenant_id", VALUES["tenant_id"], ctx)
        ctx = baggage.set_baggage("user_id", VALUES["user_id"], ctx)
        token = otel_context.attach(ctx)
        try:
            await release.wait()
        finally:
            otel_context.detach(token)

    async def scoped(release: asyncio.Event) -> None:
        with bridge.scope(request_id=cb.new_request_id(), tenant_id="acme", user_id="u-42"):
            await release.wait()

    base = _bytes_per_request(bare, n)
    raw_cost = _bytes_per_request(raw, n) - base
    ours = _bytes_per_request(scoped, n) - base
    print(
        f"    memory: raw OTel baggage {raw_cost:.0f} B/request, 3-field scope {ours:.0f} B/request"
    )
    return [("memory per in-flight 3-field scope / raw baggage", ours / raw_cost, 1.0)]


def run() -> list[Row]:
    """All core rows."""
    return timings() + memory()
