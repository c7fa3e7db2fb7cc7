"""The pytest plugin otel_ctxbridge.testing, run on generated test suites with pytester."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.util._once import Once

pytest_plugins = ["pytester"]

CONFTEST = """
import pytest
import otel_ctxbridge as cb

BRIDGE = cb.ContextBridge(
    [cb.Field("request_id"), cb.Field("tenant_id"), cb.Field("user_id", propagate=False)]
)

@pytest.fixture
def ctxbridge_bridge():
    return BRIDGE
"""


@pytest.fixture
def suite(pytester: pytest.Pytester) -> Iterator[pytest.Pytester]:
    """A generated suite with a conftest naming its bridge, in asyncio auto mode; the global
    OTel providers the inner tests install are unset afterwards."""
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makeconftest(CONFTEST)
    yield pytester
    from opentelemetry._logs import _internal as logs_internal

    trace._TRACER_PROVIDER_SET_ONCE = Once()  # type: ignore[attr-defined]
    trace._TRACER_PROVIDER = None  # type: ignore[attr-defined]
    logs_internal._LOGGER_PROVIDER_SET_ONCE = Once()
    logs_internal._LOGGER_PROVIDER = None


def test_the_plugin_is_harmless_in_a_suite_that_does_not_use_it(
    pytester: pytest.Pytester,
) -> None:
    """Loaded through its entry point, the plugin changes nothing for plain sync and async
    tests, and its marker is registered (so --strict-markers accepts it)."""
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makepyfile(
        """
        import asyncio, logging

        def test_sync():
            logging.getLogger("x").warning("plain")

        async def test_async():
            await asyncio.sleep(0)
        """
    )
    result = pytester.runpytest("--strict-markers")
    result.assert_outcomes(passed=2)
    markers = pytester.runpytest("--markers")
    markers.stdout.fnmatch_lines(["*ctxbridge_no_leaks*"])


def test_span_and_log_capture_fixtures_give_the_fields(suite: pytest.Pytester) -> None:
    """ctxbridge_spans and ctxbridge_logs capture what the test produced, with the bridge's
    fields (on spans through a provider the plugin installs when the app has none)."""
    suite.makepyfile(
        """
        import logging
        from opentelemetry import trace
        from conftest import BRIDGE

        def test_capture(ctxbridge_spans, ctxbridge_logs):
            ctxbridge_logs.set_level(logging.INFO)
            with BRIDGE.scope(request_id="r-1", user_id="u-1"):
                with trace.get_tracer("t").start_as_current_span("handler") as span:
                    logging.getLogger("app").info("inside")
            logging.getLogger("app").info("outside")
            handler = ctxbridge_spans.span("handler")
            assert ctxbridge_spans.fields(handler) == {"request_id": "r-1", "user_id": "u-1"}
            inside, outside = ctxbridge_logs.records
            fields = ctxbridge_logs.fields(inside)
            assert fields["request_id"] == "r-1"
            assert fields["trace_id"] == format(span.get_span_context().trace_id, "032x")
            assert ctxbridge_logs.fields(outside)["request_id"] == "-"
            assert ctxbridge_logs.messages() == ["inside", "outside"]
            ctxbridge_spans.clear()
            ctxbridge_logs.clear()
            assert ctxbridge_spans.spans == [] and ctxbridge_logs.records == []

        def test_nothing_is_captured_after_a_test(ctxbridge_spans):
            trace.get_tracer("t").start_span("fresh").end()
            assert [s.name for s in ctxbridge_spans.spans] == ["fresh"]
        """
    )
    suite.runpytest().assert_outcomes(passed=2)


def test_captures_follow_the_configured_app(suite: pytest.Pytester) -> None:
    """Without an override, ctxbridge_bridge is the bridge given to configure(); the
    captures then record from configure()'s providers, OTel log records included."""
    suite.makeconftest("")
    suite.makepyfile(
        """
        import logging
        import pytest
        from opentelemetry import trace
        import otel_ctxbridge as cb
        from otel_ctxbridge.sdk import configure

        BRIDGE = cb.ContextBridge([cb.Field("request_id")])

        @pytest.fixture
        def app():
            telemetry = configure(BRIDGE, service_name="svc", otlp=False)
            yield telemetry
            telemetry.shutdown()

        def test_configured(app, ctxbridge_spans, ctxbridge_logs):
            assert ctxbridge_spans.bridge is BRIDGE
            logging.getLogger("app").warning("hi")
            with BRIDGE.scope(request_id="r-9"):
                trace.get_tracer("t").start_span("op").end()
                logging.getLogger("app").warning("in scope")
            assert ctxbridge_spans.fields(ctxbridge_spans.span("op")) == {"request_id": "r-9"}
            attributes = ctxbridge_logs.otel_records[-1].log_record.attributes
            assert attributes["app.request_id"] == "r-9"

        def test_without_configure_the_fixture_says_what_to_do(ctxbridge_spans):
            pass
        """
    )
    result = suite.runpytest()
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*define a `ctxbridge_bridge` fixture*"])


LEAKS = """
import asyncio
import contextvars
import pytest
from opentelemetry import baggage
from otel_ctxbridge import _runtime
from conftest import BRIDGE

KEPT = []

@pytest.fixture(scope="module", autouse=True)
def close_kept():
    yield
    for gen in KEPT:
        gen.close()  # leaves the scope, restoring what the detector restored already

@pytest.mark.ctxbridge_no_leaks
def test_scope_entered_and_never_left():
    BRIDGE.scope(request_id="r-open").__enter__()

def test_the_next_test_starts_clean():
    assert BRIDGE.get("request_id") is None

@pytest.mark.ctxbridge_no_leaks
def test_balanced_scopes_pass():
    with BRIDGE.scope(request_id="r-ok"):
        with BRIDGE.scope(tenant_id="t"):
            pass

@pytest.mark.ctxbridge_no_leaks
async def test_balanced_async_passes():
    async with BRIDGE.scope(request_id="r-ok"):
        await asyncio.sleep(0)

@pytest.mark.ctxbridge_no_leaks
async def test_async_attach_without_detach():
    _runtime.attach(baggage.set_baggage("k", "v"))
    await asyncio.sleep(0)

@pytest.mark.ctxbridge_no_leaks
def test_generator_suspended_inside_a_scope():
    def rows():
        with BRIDGE.scope(request_id="r-gen"):
            yield 1
            yield 2
    gen = rows()
    next(gen)
    KEPT.append(gen)  # outlives the test, still holding the scope open

@pytest.mark.ctxbridge_no_leaks
def test_scope_left_in_another_context():
    scope = BRIDGE.scope(request_id="r-elsewhere")
    contextvars.copy_context().run(scope.__enter__)
    scope.__exit__(None, None, None)

def test_with_the_fixture_instead_of_the_marker(ctxbridge_no_leaks):
    BRIDGE.scope(request_id="r-open").__enter__()
"""


def test_the_leak_detector_fails_leaking_tests_only(suite: pytest.Pytester) -> None:
    """Marked (or fixture-requesting) tests fail when they leave a scope or context
    attached, sync or async, or when a detach fails; balanced ones pass, and the context is
    restored for the next test."""
    suite.makepyfile(test_leaks=LEAKS)
    result = suite.runpytest()
    outcomes = {
        "test_scope_entered_and_never_left": "failed",
        "test_the_next_test_starts_clean": "passed",
        "test_balanced_scopes_pass": "passed",
        "test_balanced_async_passes": "passed",
        "test_async_attach_without_detach": "failed",
        "test_generator_suspended_inside_a_scope": "failed",
        "test_scope_left_in_another_context": "failed",
        "test_with_the_fixture_instead_of_the_marker": "failed",
    }
    reports = {
        r.nodeid.split("::")[-1]: r.outcome
        for r in result.reprec.getreports("pytest_runtest_logreport")  # type: ignore[attr-defined]
        if r.when == "call"
    }
    assert reports == outcomes
    result.stdout.fnmatch_lines(
        [
            "*LeakError: otel_ctxbridge: the test ended with another OTel context attached*",
            "*LeakError: otel_ctxbridge: the test's task ended with another OTel context*",
            "*LeakError: otel_ctxbridge: 1 context detach(es) failed while the test ran*",
        ]
    )


def test_unmarked_tests_are_left_alone(suite: pytest.Pytester) -> None:
    """Without the marker or fixture a leaking test is not failed by the plugin."""
    suite.makepyfile(
        """
        from conftest import BRIDGE

        def test_leaks_but_nobody_asked():
            BRIDGE.scope(request_id="r-open").__enter__()
        """
    )
    suite.runpytest_subprocess().assert_outcomes(passed=1)


def test_span_capture_says_why_it_cannot_record_a_non_sdk_provider(
    suite: pytest.Pytester,
) -> None:
    """With a global TracerProvider that is not the SDK's (OTel will not replace it), the
    span capture fails saying so instead of staying silently empty."""
    suite.makepyfile(
        """
        from opentelemetry import trace

        def test_api_only_provider(request):
            trace.set_tracer_provider(trace.NoOpTracerProvider())
            request.getfixturevalue("ctxbridge_spans")
        """
    )
    result = suite.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*NoOpTracerProvider, not the OTel SDK's*"])
