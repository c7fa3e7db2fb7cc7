"""Running work on other threads and processes in the context of the code that submits it.

What carries the context already and what does not:

- ``asyncio`` tasks, ``loop.call_soon`` callbacks, ``asyncio.to_thread`` and anyio's
  ``to_thread.run_sync`` copy the context: nothing to do.
- ``threading.Thread``, ``ThreadPoolExecutor.submit`` and ``loop.run_in_executor`` do not:
  a task starts in an empty context (or, in a pool thread, whatever that thread last held).
  Use :class:`ContextExecutor`, :func:`run_in_executor`, or wrap the callable with
  ``bridge.bind(fn)`` at the point where the context is right::

      threading.Thread(target=bridge.bind(work)).start()
      await loop.run_in_executor(None, bridge.bind(work))      # == run_in_executor(None, work)
      some_library.on_event(bridge.bind(callback))

- Processes share no memory: :class:`ContextProcessExecutor` (or :func:`submit_with_context`
  on any ``ProcessPoolExecutor``) sends the context as W3C headers with each task and restores
  it in the worker process; process-local fields stay behind, as everywhere else. They submit
  from an empty context: a pool starts its workers when tasks are submitted, and a worker
  *forked* inside a request would otherwise keep that request's context (process-local values
  included) for every plain ``submit`` it runs afterwards.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

from . import _runtime as rt
from .bridge import ContextBridge
from .carriers import call_with_headers
from .propagation import default_propagator

__all__ = [
    "ContextExecutor",
    "ContextProcessExecutor",
    "context_headers",
    "run_in_executor",
    "submit_with_context",
]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


def _in_this_context(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` bound to a copy of the current ``contextvars`` context (OTel's included)."""
    if rt._VAR is None:  # pragma: no cover - a custom OTel runtime context is not a ContextVar
        fn = rt.bind_context(fn)
    return functools.partial(contextvars.copy_context().run, fn)


def _from_an_empty_context(submit: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``submit(*args, **kwargs)`` (a process pool's ``submit``, or ``loop.run_in_executor``)
    called in an empty ``contextvars`` context, so that a worker process it forks starts with
    none (the task carries its own, as headers)."""
    return contextvars.Context().run(submit, *args, **kwargs)


def context_headers(bridge: ContextBridge | None = None) -> dict[str, str]:
    """The current context as a plain dict: ``traceparent`` (and ``tracestate``) plus
    ``baggage``. With ``bridge``, the request's late ``update()`` values are included."""
    headers: dict[str, str] = {}
    if bridge is not None:
        return bridge.inject(headers)
    default_propagator().inject(headers)
    return headers


class ContextExecutor(ThreadPoolExecutor):
    """A ``ThreadPoolExecutor`` whose tasks run in the context they were submitted from.

    Each ``submit`` (and each call ``map`` makes) captures the submitter's context; the task
    runs in a copy of it, so ``bridge.get``, spans, logs and outbound calls in the task see the
    submitting request, and a task's own changes never leak into the pool thread.
    """

    def submit(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Future[R]:
        """Schedule ``fn(*args, **kwargs)`` to run in the current context."""
        return super().submit(_in_this_context(fn), *args, **kwargs)


class ContextProcessExecutor(ProcessPoolExecutor):
    """A ``ProcessPoolExecutor`` whose tasks run, in the worker process, in the trace and
    baggage of the context they were submitted from.

    The context travels as W3C headers (see :func:`~otel_ctxbridge.carriers.call_with_headers`);
    ``fn`` and its arguments must be picklable as usual. Pass ``bridge`` to include the
    request's late ``update()`` values. Process-local fields do not cross.
    """

    def __init__(
        self, max_workers: int | None = None, *, bridge: ContextBridge | None = None, **kwargs: Any
    ) -> None:
        super().__init__(max_workers, **kwargs)
        self._bridge = bridge

    def submit(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Future[R]:
        """Schedule ``fn(*args, **kwargs)`` in a worker process, in the current context."""
        headers = context_headers(self._bridge)
        submit = super().submit
        return _from_an_empty_context(submit, call_with_headers, headers, fn, *args, **kwargs)


def submit_with_context(
    executor: Executor,
    fn: Callable[..., R],
    /,
    *args: Any,
    bridge: ContextBridge | None = None,
    **kwargs: Any,
) -> Future[R]:
    """``executor.submit(fn, *args, **kwargs)``, run in the current context: a copy of it on a
    thread pool, its W3C headers on a process pool. For executors you do not create."""
    if isinstance(executor, (ContextExecutor, ContextProcessExecutor)):
        return executor.submit(fn, *args, **kwargs)
    if isinstance(executor, ProcessPoolExecutor):
        headers = context_headers(bridge)
        return _from_an_empty_context(
            executor.submit, call_with_headers, headers, fn, *args, **kwargs
        )
    return executor.submit(_in_this_context(fn), *args, **kwargs)


def run_in_executor(
    executor: Executor | None,
    fn: Callable[..., R],
    /,
    *args: Any,
    loop: asyncio.AbstractEventLoop | None = None,
    bridge: ContextBridge | None = None,
) -> asyncio.Future[R]:
    """``loop.run_in_executor(executor, fn, *args)`` in the current context.

    ``loop.run_in_executor`` does not copy the context (``asyncio.to_thread`` does); this
    does, for the default executor (``None``), thread pools and process pools alike. Pass
    ``bridge`` to send a plain process pool the request's late ``update()`` values too (a
    thread sees them anyway).
    """
    running = asyncio.get_running_loop() if loop is None else loop
    if isinstance(executor, ProcessPoolExecutor) and not isinstance(
        executor, ContextProcessExecutor
    ):
        call = functools.partial(call_with_headers, context_headers(bridge), fn, *args)
        return _from_an_empty_context(running.run_in_executor, executor, call)
    if isinstance(executor, (ContextExecutor, ContextProcessExecutor)):
        return running.run_in_executor(executor, fn, *args)
    return running.run_in_executor(executor, _in_this_context(fn), *args)
