"""pytest plugin for test suites of apps using otel_ctxbridge (loaded through its entry point).

Everything is opt-in, so loading the plugin changes nothing in a test suite that does not ask:

- ``ctxbridge_spans``: a :class:`SpanCapture` of the spans finished during the test. It adds a
  recorder to the global SDK ``TracerProvider`` (the one ``configure()`` installed); when there
  is none it installs one that also runs :class:`~otel_ctxbridge.ContextSpanProcessor`.
- ``ctxbridge_logs``: a :class:`LogCapture` of the stdlib log records (through
  :class:`~otel_ctxbridge.ContextLogFilter`) and of the OTel log records of the global SDK
  ``LoggerProvider``, if there is one.
- ``ctxbridge_bridge``: the bridge the captures read fields with. By default the bridge given to
  the active ``configure()``; override this fixture in your ``conftest.py`` to return your own.
- the leak detector: mark a test (or a module, with ``pytestmark``) with
  ``@pytest.mark.ctxbridge_no_leaks``, or request the ``ctxbridge_no_leaks`` fixture. The test
  fails when it ends with another OTel context attached than it started with (an attach without
  detach, a scope entered and never left, a generator suspended inside a scope), or when a
  detach failed during it (a scope left in another task or thread, see
  ``otel_ctxbridge._runtime.detach_failures``). Async tests are checked inside their own task.

Example::

    @pytest.mark.ctxbridge_no_leaks
    def test_handler(ctxbridge_spans, ctxbridge_logs):
        with bridge.scope(request_id="r-1"):
            handler()
        assert ctxbridge_spans.fields(ctxbridge_spans.span("handler"))["request_id"] == "r-1"
"""

from __future__ import annotations

import functools
import gc
import inspect
import logging
import weakref
from collections.abc import Callable, Coroutine, Generator, Iterator
from typing import TYPE_CHECKING, Any

import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider

from . import _runtime as rt

if TYPE_CHECKING:
    from opentelemetry.sdk._logs import ReadWriteLogRecord

    from .bridge import ContextBridge

__all__ = ["LeakError", "LogCapture", "SpanCapture"]

MARKER = "ctxbridge_no_leaks"
_CHECKED = pytest.StashKey[int]()  # detach_failures when the checked test's call started


class LeakError(AssertionError):
    """A test left an OTel context attached, or a detach failed while it ran."""


# -- spans -------------------------------------------------------------------------------------


class _SpanRecorder(SpanProcessor):
    """Added once to an SDK provider; forwards to the capture active now, if any."""

    def __init__(self, stamps: bool) -> None:
        self.capture: SpanCapture | None = None
        self.stamps = stamps  # True on a provider this plugin made: also add the fields

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        capture = self.capture
        if capture is not None and self.stamps:
            capture._processor.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        capture = self.capture
        if capture is not None:
            capture._spans.append(span)


_recorders: weakref.WeakKeyDictionary[TracerProvider, _SpanRecorder] = weakref.WeakKeyDictionary()


class SpanCapture:
    """The spans finished while the capture is active, and the bridge's fields on them."""

    def __init__(self, bridge: ContextBridge) -> None:
        from .spans import ContextSpanProcessor  # noqa: PLC0415 - the plugin loads lazily

        self.bridge = bridge
        self._processor = ContextSpanProcessor(bridge)
        self._spans: list[ReadableSpan] = []
        self._recorder: _SpanRecorder | None = None
        self.tracer_provider: TracerProvider | None = None
        """The SDK provider recorded from (global unless another API provider was set)."""

    def start(self) -> SpanCapture:
        """Start recording the global SDK provider's spans (installing one when needed)."""
        provider = trace.get_tracer_provider()
        if not isinstance(provider, TracerProvider):
            provider = TracerProvider()
            trace.set_tracer_provider(provider)  # refused (and logged) when one is set
        recorder = _recorders.get(provider)
        if recorder is None:
            recorder = _SpanRecorder(stamps=not _has_context_processor(provider))
            provider.add_span_processor(recorder)
            _recorders[provider] = recorder
        recorder.capture = self
        self._recorder = recorder
        self.tracer_provider = provider
        return self

    def stop(self) -> None:
        """Stop recording; the captured spans stay readable."""
        if self._recorder is not None and self._recorder.capture is self:
            self._recorder.capture = None
        self._recorder = None

    @property
    def spans(self) -> list[ReadableSpan]:
        """The finished spans, in the order they ended."""
        return list(self._spans)

    def span(self, name: str) -> ReadableSpan:
        """The last finished span called ``name``; fails the test when there is none."""
        for span in reversed(self._spans):
            if span.name == name:
                return span
        raise AssertionError(f"no finished span named {name!r}: {[s.name for s in self._spans]}")

    def fields(self, span: ReadableSpan) -> dict[str, Any]:
        """The declared fields on ``span`` by field name (as shown: redacted when declared)."""
        attributes = span.attributes or {}
        out: dict[str, Any] = {}
        for name, field in self.bridge.fields.items():
            if field.attribute in attributes:
                out[name] = attributes[str(field.attribute)]
        return out

    def clear(self) -> None:
        """Forget the spans captured so far."""
        self._spans.clear()


def _has_context_processor(provider: TracerProvider) -> bool:
    from .spans import ContextSpanProcessor  # noqa: PLC0415 - the plugin loads lazily

    active = getattr(provider, "_active_span_processor", None)
    processors = getattr(active, "_span_processors", ())
    return any(isinstance(p, ContextSpanProcessor) for p in processors)


# -- logs --------------------------------------------------------------------------------------


class _Handler(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.NOTSET)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class LogCapture:
    """Stdlib log records (with the fields set by ``ContextLogFilter``) and OTel log records
    emitted while the capture is active."""

    def __init__(self, bridge: ContextBridge) -> None:
        from .logs import ContextLogFilter  # noqa: PLC0415 - the plugin loads lazily

        self.bridge = bridge
        self.records: list[logging.LogRecord] = []
        """The stdlib log records that reached the root logger."""
        self.otel_records: list[ReadWriteLogRecord] = []
        """The OTel log records emitted by the global SDK LoggerProvider, if there is one."""
        self._handler = _Handler(self.records)
        self._handler.addFilter(ContextLogFilter(bridge))
        self._levels: list[tuple[logging.Logger, int]] = []
        self._otel: _LogRecorder | None = None

    def start(self) -> LogCapture:
        """Attach the handler to the root logger and the recorder to the OTel provider."""
        logging.getLogger().addHandler(self._handler)
        from opentelemetry._logs import get_logger_provider  # noqa: PLC0415 - lazily

        provider = get_logger_provider()
        add = getattr(provider, "add_log_record_processor", None)
        if add is not None:
            recorder = _log_recorders.get(provider)
            if recorder is None:
                recorder = _LogRecorder()
                add(recorder)
                _log_recorders[provider] = recorder
            recorder.capture = self
            self._otel = recorder
        return self

    def stop(self) -> None:
        """Detach from the loggers and restore the levels changed by :meth:`set_level`."""
        logging.getLogger().removeHandler(self._handler)
        for logger, level in reversed(self._levels):
            logger.setLevel(level)
        self._levels.clear()
        if self._otel is not None and self._otel.capture is self:
            self._otel.capture = None
        self._otel = None

    def set_level(self, level: int | str, logger: str | None = None) -> None:
        """Set a logger's level (root by default) until the end of the test."""
        target = logging.getLogger(logger)
        self._levels.append((target, target.level))
        target.setLevel(level)

    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
        """The declared fields and ``trace_id``/``span_id`` of ``record``, by field name."""
        out = {
            name: getattr(record, str(field.log_key), None)
            for name, field in self.bridge.fields.items()
        }
        out["trace_id"] = getattr(record, "trace_id", None)
        out["span_id"] = getattr(record, "span_id", None)
        return out

    def messages(self) -> list[str]:
        """The formatted messages of the captured stdlib records."""
        return [r.getMessage() for r in self.records]

    def clear(self) -> None:
        """Forget the records captured so far."""
        self.records.clear()
        self.otel_records.clear()


class _LogRecorder:
    """Added once to an SDK LoggerProvider; forwards to the active capture, if any."""

    def __init__(self) -> None:
        self.capture: LogCapture | None = None

    def on_emit(self, log_record: ReadWriteLogRecord) -> None:
        capture = self.capture
        if capture is not None:
            capture.otel_records.append(log_record)

    def enabled(self, **_: Any) -> bool:
        return True

    def shutdown(self) -> None:
        self.capture = None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


_log_recorders: weakref.WeakKeyDictionary[object, _LogRecorder] = weakref.WeakKeyDictionary()


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def ctxbridge_bridge() -> ContextBridge:
    """The bridge whose fields the captures read; override it to return your own bridge."""
    from .sdk import active_telemetry  # noqa: PLC0415 - the plugin loads lazily

    telemetry = active_telemetry()
    if telemetry is None:
        pytest.fail(
            "otel_ctxbridge: no configure() is active; define a `ctxbridge_bridge` fixture "
            "returning your ContextBridge",
            pytrace=False,
        )
    return telemetry.bridge


@pytest.fixture
def ctxbridge_spans(ctxbridge_bridge: ContextBridge) -> Iterator[SpanCapture]:
    """Capture the spans finished during the test, with the bridge's fields."""
    capture = SpanCapture(ctxbridge_bridge).start()
    yield capture
    capture.stop()


@pytest.fixture
def ctxbridge_logs(ctxbridge_bridge: ContextBridge) -> Iterator[LogCapture]:
    """Capture the log records emitted during the test, with the bridge's fields."""
    capture = LogCapture(ctxbridge_bridge).start()
    yield capture
    capture.stop()


@pytest.fixture
def ctxbridge_no_leaks() -> None:
    """Requesting this fixture turns on the leak detector for the test (like the marker)."""


# -- leak detector -----------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    """Register the leak detector's marker."""
    config.addinivalue_line(
        "markers",
        f"{MARKER}: fail the test when it leaves an OTel context attached or a detach fails "
        "(otel_ctxbridge leak detector)",
    )


def _checked(item: pytest.Item) -> bool:
    return item.get_closest_marker(MARKER) is not None or MARKER in getattr(
        item, "fixturenames", ()
    )


def _leak_message(where: str) -> str:
    return (
        f"otel_ctxbridge: {where} ended with another OTel context attached than it started "
        "with: a scope entered without leaving, an attach without detach, or a generator "
        "suspended inside a scope"
    )


def _checking(fn: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., Any]:
    @functools.wraps(fn)
    async def checked(*args: Any, **kwargs: Any) -> Any:
        before = rt.get_current()
        result = await fn(*args, **kwargs)
        if rt.get_current() is not before:
            rt.attach(before)
            raise LeakError(_leak_message("the test's task"))
        return result

    return checked


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, Any]:
    """Run a marked test under the leak detector."""
    if not _checked(item):
        return (yield)
    fn: Any = getattr(item, "obj", None)
    patched = inspect.iscoroutinefunction(fn)
    if patched:
        item.obj = _checking(fn)  # type: ignore[attr-defined] # a pytest Function item
    before = rt.get_current()
    failures = rt.detach_failures
    leaked = False
    try:
        result = yield
    finally:
        if patched:
            item.obj = fn  # type: ignore[attr-defined] # restore the original function
        if rt.get_current() is not before:
            rt.attach(before)  # restore, so that the following tests are not affected
            leaked = True
        gc.collect()  # finalise abandoned generators now, while the test is still running
        item.stash[_CHECKED] = rt.detach_failures  # teardown reports only later failures
    if leaked:
        raise LeakError(_leak_message("the test"))
    _check_detaches(failures, "while the test ran")
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, Any, Any]:
    """Report detach failures that surfaced while a checked test's fixtures were torn down."""
    result = yield
    failures = item.stash.get(_CHECKED, None)
    if failures is not None:
        del item.stash[_CHECKED]
        gc.collect()
        _check_detaches(failures, "after the test (teardown, event loop shutdown)")
    return result


def _check_detaches(before: int, when: str) -> None:
    failed = rt.detach_failures - before
    if failed > 0:
        raise LeakError(
            f"otel_ctxbridge: {failed} context detach(es) failed {when}: a scope or attached "
            "context was left in another task or thread (e.g. a generator suspended inside "
            "a scope and closed elsewhere)"
        )
