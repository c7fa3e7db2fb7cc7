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
from collections.abc import Callable, Coroutine, Generator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from . import _runtime as rt
from ._testing_capture import LogCapture, SpanCapture

if TYPE_CHECKING:
    from .bridge import ContextBridge

__all__ = ["LeakError", "LogCapture", "SpanCapture"]

MARKER = "ctxbridge_no_leaks"
_CHECKED = pytest.StashKey[int]()  # detach_failures when the checked test's call started


class LeakError(AssertionError):
    """A test left an OTel context attached, or a detach failed while it ran."""


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
