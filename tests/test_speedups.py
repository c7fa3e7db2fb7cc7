"""The compiled accelerator (``_speedups.c``): it is built where CI runs, it gives the same
contexts and errors as the pure-Python reference, and it neither leaks nor keeps cycles."""

from __future__ import annotations

import asyncio
import copy
import gc
import os
import pickle
import re
import subprocess
import sys
import threading
import tracemalloc
import weakref
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry import baggage, propagate
from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import otel_ctxbridge as cb
from otel_ctxbridge import _accel, _derive, _runtime, _scope
from otel_ctxbridge._state import next_generation
from otel_ctxbridge.fields import uuid4_texts

compiled = pytest.mark.skipif(
    _accel.speedups is None, reason="the accelerator is not built or is switched off"
)


def _bridge() -> cb.ContextBridge:
    return cb.ContextBridge(
        [
            cb.Field("plain", max_length=8),
            cb.Field("pattern", validator=r"[a-z]{1,5}"),
            cb.Field("pred", validator=lambda value: value.startswith("p")),
            cb.Field("local", propagate=False),
            cb.Field("renamed", baggage_key="app.renamed"),
        ]
    )


BRIDGE = _bridge()
NAMES = ["plain", "pattern", "pred", "local", "renamed", "unknown"]
VALUES = st.one_of(
    st.none(),
    st.text(alphabet="abcxyz0-", max_size=10),
    st.text(max_size=6),
    st.sampled_from(["p1", "pq", "abc", "ABC", "é", "a\nb", "\ud800", "x" * 300]),
    st.integers(),
)


def _starts() -> Iterator[tuple[str, Context]]:
    """Contexts a scope may be entered on: the interesting kinds of parents."""
    empty = Context()
    yield "empty", empty
    with_bag = BRIDGE.derive(empty, {"plain": "p0", "renamed": "r0", "local": object()})
    yield "baggage", with_bag
    yield "foreign baggage", baggage.set_baggage("other", "o", context=with_bag)
    crowded = empty
    for i in range(180):
        crowded = baggage.set_baggage(f"m{i}", "v", context=crowded)
    yield "180 members", crowded
    frame = BRIDGE.new_frame(())
    in_request = BRIDGE.derive(with_bag, {"pattern": "req"}, frame=frame)
    yield "request", in_request
    pending_frame = BRIDGE.new_frame(())
    pending = BRIDGE.derive(empty, {"plain": "p1"}, frame=pending_frame)
    pending_frame.record({"pattern": "late"}, next_generation())
    yield "pending update", pending


STARTS = dict(_starts())


def _outcome(
    make: Any, start: Context, values: Mapping[str, Any], by_hand: bool = False
) -> tuple[Any, ...]:
    """Enter a scope made by ``make`` on ``start`` (in a ``with`` block, or by calling
    ``__enter__`` and ``__exit__``): what the context inside holds, or the error entering
    raised."""
    token = _runtime.attach(start)
    try:
        try:
            scope = make(values)
            if by_hand:
                scope.__enter__()
                inside = _runtime.get_current()
                scope.__exit__(None, None, None)
            else:
                with scope:
                    inside = _runtime.get_current()
        except Exception as exc:  # compared between the two implementations
            return ("error", type(exc), str(exc))
        assert _runtime.get_current() is start
    finally:
        _runtime.detach(token)
    return _described(inside)


def _described(ctx: Context) -> tuple[Any, ...]:
    """What a context holds, comparably: baggage in order, other entries, the state."""
    state: Any = ctx.get(BRIDGE._key)
    others = {k: v for k, v in ctx.items() if k not in (BRIDGE._key, _runtime.BAGGAGE_KEY)}
    bag = ctx.get(_runtime.BAGGAGE_KEY)
    return (
        "ok",
        list(bag.items()) if bag is not None else None,
        others,
        (dict(state.local), state.frame, state.generation == 0) if state is not None else None,
    )


@compiled
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    start=st.sampled_from(sorted(STARTS)),
    values=st.dictionaries(st.sampled_from(NAMES), VALUES, max_size=4),
    by_hand=st.booleans(),
)
def test_compiled_scope_gives_the_same_context_or_error_as_python(
    start: str, values: dict[str, Any], by_hand: bool
) -> None:
    """For any values on any kind of parent context, entering the compiled scope and the
    pure-Python one give equal contexts (baggage in the same order, the same state), or the
    same error with the same message: in a ``with`` block (where the compiled scope's
    baggage is also its state and its way back) and entered by hand (a ContextVar token)."""
    compiled_outcome = _outcome(lambda v: BRIDGE.scope(**v), STARTS[start], values, by_hand)
    saved, _derive._compiled = _derive._compiled, None  # the reference: Python only
    try:
        python_outcome = _outcome(
            lambda v: _scope.PyScopeCore(BRIDGE, v), STARTS[start], values, by_hand
        )
    finally:
        _derive._compiled = saved
    assert compiled_outcome == python_outcome


@compiled
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    start=st.sampled_from(sorted(STARTS)),
    values=st.dictionaries(st.sampled_from(NAMES), VALUES, max_size=4),
    request=st.booleans(),
)
def test_compiled_derive_gives_the_same_context_or_error_as_python(
    start: str, values: dict[str, Any], request: bool
) -> None:
    """bridge.derive (compiled for the common case) and the Python derive agree, also when
    starting a request frame as the ASGI middleware does."""
    frame = BRIDGE.new_frame(()) if request else None

    def outcome(derive: Any) -> tuple[Any, ...]:
        try:
            return _described(derive(BRIDGE, STARTS[start], values, frame))
        except Exception as exc:  # compared between the two implementations
            return ("error", type(exc), str(exc))

    assert outcome(_derive.derive_context) == outcome(_derive.derive_in_python)


@compiled
@given(raw=st.lists(st.binary(min_size=16, max_size=16), max_size=70).map(b"".join))
def test_compiled_request_ids_are_the_same_text_as_python(raw: bytes) -> None:
    """The compiled UUID4 formatting gives, for the same random bytes, the text the Python
    one gives (version and variant bits set, lowercase, 8-4-4-4-12)."""
    assert _accel.speedups is not None
    assert _accel.speedups.uuid4_texts(raw) == uuid4_texts(raw)


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="checked where CI builds the project")
def test_the_accelerator_is_built_and_used_in_ci() -> None:
    """CI installs with a C compiler: the compiled scope must be what bridge.scope returns,
    so the suite and the benchmarks exercise it (the pure-Python run sets the switch)."""
    if os.environ.get("OTEL_CTXBRIDGE_NO_EXTENSIONS"):
        assert _accel.speedups is None
        assert isinstance(_bridge().scope(plain="a"), _scope.PyScopeCore)
        return
    assert _accel.speedups is not None, "the C accelerator was not built"
    assert isinstance(_bridge().scope(plain="a"), _accel.speedups.ScopeCore)


@compiled
def test_compiled_scope_takes_keywords_only_and_keeps_its_own_values() -> None:
    """scope() refuses positional values, and later changes to the caller's dict do not
    reach a scope made from it."""
    with pytest.raises(TypeError, match="keyword"):
        BRIDGE.scope({"plain": "a"})  # type: ignore[call-arg]
    values = {"plain": "a"}
    scope = BRIDGE.scope(**values)
    values["plain"] = "changed"
    with scope:
        assert BRIDGE.get("plain") == "a"


@compiled
def test_a_scope_built_from_the_class_works_like_one_from_bridge_scope() -> None:
    """Scope(bridge, values), as the pure-Python class is called, also works compiled."""
    with _scope.Scope(BRIDGE, {"plain": "a"}) as scope:
        assert BRIDGE.get("plain") == "a"
        assert scope._bridge is BRIDGE
    assert BRIDGE.get("plain") is None


def _get_outcome(get: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    try:
        return ("ok", get(*args, **kwargs))
    except Exception as exc:  # compared between the two implementations
        return ("error", type(exc), str(exc))


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        (("plain",), {}),
        (("local", "default"), {}),
        (("pattern",), {"default": 7}),
        (("unknown",), {}),
        ((["unhashable"],), {}),
        ((), {"name": "plain"}),
        (("plain", 1, 2), {}),
    ],
)
@compiled
@pytest.mark.parametrize("reads_before", [0, 1, 2])
def test_compiled_get_answers_like_the_python_method(
    args: tuple[Any, ...], kwargs: dict[str, Any], reads_before: int
) -> None:
    """bridge.get gives the same value, default or error as ContextBridge.get, whether the
    context is not cached yet (0 or 1 reads before) or cached (2)."""
    with BRIDGE.scope(plain="p", local=None):
        for _ in range(reads_before):
            BRIDGE.get("plain")
        compiled_outcome = _get_outcome(BRIDGE.get, args, kwargs)
        python_outcome = _get_outcome(
            lambda *a, **k: cb.ContextBridge.get(BRIDGE, *a, **k), args, kwargs
        )
    assert compiled_outcome == python_outcome


def test_a_subclass_overriding_scope_or_get_keeps_its_own() -> None:
    """The compiled scope() and get() replace only the bridge's own methods, never a
    subclass's."""

    class Audited(cb.ContextBridge):
        calls = 0

        def scope(self, **values: Any) -> _scope.Scope:
            Audited.calls += 1
            return super().scope(**values)

    bridge = Audited([cb.Field("plain")])
    with bridge.scope(plain="a"):
        assert bridge.get("plain") == "a"
    assert Audited.calls == 1

    class Defaulting(cb.ContextBridge):
        def get(self, name: str, default: Any = "none") -> Any:
            return super().get(name, default)

    assert Defaulting([cb.Field("plain")]).get("plain") == "none"


def _growth(fn: Any, rounds: int = 20_000) -> int:
    for _ in range(1_000):  # warm caches (interned strings, free lists)
        fn()
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(rounds):
        fn()
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return after - before


def _enter_valid() -> None:
    with BRIDGE.scope(plain="a", pattern="abc", renamed="r"):
        pass


def _enter_local() -> None:
    with BRIDGE.scope(plain="a", local=object()):  # the Python fallback inside the C enter
        pass


def _enter_invalid() -> None:
    try:
        with BRIDGE.scope(plain="a", pattern="NOT VALID"):
            pass
    except cb.ContextValueError:
        pass


def _enter_by_hand() -> None:
    scope = BRIDGE.scope(plain="a", pattern="abc")
    scope.__enter__()
    scope.__exit__(None, None, None)


def _enter_exit_looked_up_first() -> None:
    scope = BRIDGE.scope(plain="a")
    leave = scope.__exit__  # as a with statement does: then the scope leaves through it
    scope.__enter__()
    leave(None, None, None)
    scope.__exit__(None, None, None)  # a second exit does nothing


ENTERS = [_enter_valid, _enter_local, _enter_invalid, _enter_by_hand, _enter_exit_looked_up_first]


@pytest.mark.parametrize("enter", ENTERS)
def test_entering_and_leaving_scopes_does_not_leak(enter: Any) -> None:
    """20,000 scopes (fast path, fallback, failed validation) leave no memory behind: a
    reference-counting slip would grow by at least a dict or a context each time."""
    assert _growth(enter) < 20_000  # far below one leaked object a round (>= 40 bytes)


@pytest.mark.parametrize("enter", ENTERS)
def test_entering_and_leaving_scopes_keeps_no_reference(enter: Any) -> None:
    """The parent context, the bridge and the values are referenced exactly as often after
    1,000 scopes as before: no reference is kept (which would pin them) or dropped."""
    parent = Context(_runtime.get_current())
    token = _runtime.attach(parent)
    try:
        enter()
        watched = [parent, BRIDGE, BRIDGE._plans, BRIDGE._key, "abc", "NOT VALID"]
        before = [sys.getrefcount(obj) for obj in watched]
        for _ in range(1_000):
            enter()
        assert [sys.getrefcount(obj) for obj in watched] == before
    finally:
        _runtime.detach(token)


def test_a_cycle_through_a_scope_and_its_state_is_collected() -> None:
    """Scopes and states take part in garbage collection: a cycle through a process-local
    value and a scope kept in it is freed."""

    class Holder:
        scope: Any = None

    holder = Holder()
    probe = weakref.ref(holder)
    holder.scope = BRIDGE.scope(local=holder)
    with holder.scope:
        state: Any = _runtime.get_current()[BRIDGE._key]
        assert state.local["local"] is holder
    del holder, state
    gc.collect()
    assert probe() is None


class _Hostile(str):
    """A str subclass whose hash runs Python code that changes what is being read."""

    on_hash: Any = None

    def __hash__(self) -> int:
        if self.on_hash is not None:
            self.on_hash()
        return str.__hash__(self)

    def __eq__(self, other: object) -> bool:
        return str.__eq__(self, other)


def test_a_validator_that_raises_is_a_context_value_error_on_every_path() -> None:
    """A regex validator that raises (a bytes pattern on text) is reported as the field's
    ContextValueError by the compiled and the Python derive, and by both scope cores."""
    bridge = cb.ContextBridge([cb.Field("f", validator=re.compile(b"[a-z]+"))])
    attempts = [
        lambda: _derive.derive_context(bridge, Context(), {"f": "abc"}),
        lambda: _derive.derive_in_python(bridge, Context(), {"f": "abc"}),
        lambda: bridge.scope(f="abc").__enter__(),
        lambda: _scope.PyScopeCore(bridge, {"f": "abc"}).__enter__(),
    ]
    for attempt in attempts:
        with pytest.raises(cb.ContextValueError, match="validator raised TypeError"):
            attempt()


def test_names_and_values_that_run_code_when_hashed_never_crash() -> None:
    """str subclasses as field names (a hash that empties the values, or replaces the read
    cache) go to the Python code: the same answer or error as Python, never a crash."""

    def hostile_values() -> dict[str, Any]:
        values: dict[str, Any] = {}
        name = _Hostile("plain")
        values[name] = "a"
        values["renamed"] = _Hostile("r")
        name.on_hash = values.clear
        return values

    def outcome(derive: Any) -> Any:
        try:
            return _described(derive(BRIDGE, Context(), hostile_values()))
        except RuntimeError as exc:  # the dict changed while it was read
            return ("error", type(exc), str(exc))

    assert outcome(_derive.derive_context) == outcome(_derive.derive_in_python)
    with BRIDGE.scope(plain="p"):
        BRIDGE.get("plain")
        BRIDGE.get("plain")  # cached
        key = _Hostile("plain")
        key.on_hash = lambda: BRIDGE.__dict__.__setitem__("_last", (None, {}, {}))
        assert BRIDGE.get(key) == "p"


@compiled
async def test_a_with_block_in_flight_holds_its_context_and_one_object() -> None:
    """While a ``with bridge.scope(...)`` block waits, no scope object is alive: the block
    holds one object, the scope's baggage, which is also its state (and its way back). The
    baggage is a dict to OpenTelemetry: read, copied by ``set_baggage`` and injected as usual,
    and leaving restores the context from before."""
    release = asyncio.Event()
    inside: list[Context] = []

    async def request(i: int) -> None:
        with BRIDGE.scope(plain=f"r{i}", renamed="x"):
            inside.append(_runtime.get_current())
            await release.wait()

    def scopes_alive() -> int:
        return sum(isinstance(o, _accel.speedups.ScopeCore) for o in gc.get_objects())

    before = scopes_alive()
    tasks = [asyncio.create_task(request(i)) for i in range(50)]
    await asyncio.sleep(0)
    assert scopes_alive() == before
    ctx = inside[7]
    held = ctx[_runtime.BAGGAGE_KEY]
    assert held is ctx[BRIDGE._key]
    assert isinstance(held, dict)
    assert dict(baggage.get_all(ctx)) == {"plain": "r7", "app.renamed": "x"}
    for copied in (copy.copy(held), copy.deepcopy(held), pickle.loads(pickle.dumps(held))):
        assert type(copied) is dict
        assert copied == {"plain": "r7", "app.renamed": "x"}
    with pytest.raises(TypeError):
        type(held)()
    extended = baggage.set_baggage("other", "o", context=ctx)
    assert dict(baggage.get_all(extended)) == {"plain": "r7", "app.renamed": "x", "other": "o"}
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=extended)
    assert "plain=r7" in carrier["baggage"]
    assert "other=o" in carrier["baggage"]
    token = _runtime.attach(extended)
    try:
        assert (BRIDGE.get("plain"), BRIDGE.get("renamed")) == ("r7", "x")
    finally:
        _runtime.detach(token)
    release.set()
    await asyncio.gather(*tasks)
    assert BRIDGE.current() == {}


@compiled
@pytest.mark.parametrize("copier", [copy.deepcopy, lambda d: pickle.loads(pickle.dumps(d))])
def test_a_copied_snapshot_of_a_with_block_context_reads_its_values_and_never_raises(
    copier: Any,
) -> None:
    """A snapshot of a context taken inside a ``with`` block (``dict(ctx)``), deep-copied or
    pickled, holds one plain dict under both the baggage key and the bridge's key (the copy of
    the block's one object). Attached again, it reads as a context without a bridge state:
    the propagated values come from its baggage, a scope entered on it (compiled and Python
    derivation alike) builds on them, a span started in it gets them, and ``update()`` says
    there is no scope instead of failing on the dict."""
    with BRIDGE.scope(plain="p1", renamed="x"):
        snapshot = dict(_runtime.get_current())
    copied = copier(snapshot)
    assert type(copied[BRIDGE._key]) is dict
    token = _runtime.attach(Context(copied))
    try:
        assert (BRIDGE.get("plain"), BRIDGE.get("renamed"), BRIDGE.get("local")) == (
            "p1",
            "x",
            None,
        )
        assert BRIDGE.current() == {"plain": "p1", "renamed": "x"}
        with BRIDGE.scope(local="l1"):  # the Python derivation (a process-local field)
            assert BRIDGE.current() == {"plain": "p1", "renamed": "x", "local": "l1"}
        with BRIDGE.scope(plain="p2"):  # the compiled one
            assert BRIDGE.current() == {"plain": "p2", "renamed": "x"}
            BRIDGE.update(plain="p3")
            assert BRIDGE.get("plain") == "p3"
        with pytest.raises(cb.MissingContextError):
            BRIDGE.update(plain="p4")
        assert BRIDGE.current() == {"plain": "p1", "renamed": "x"}
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(cb.ContextSpanProcessor(BRIDGE))
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        with provider.get_tracer("snapshot").start_as_current_span("read"):
            pass
        (span,) = exporter.get_finished_spans()
        assert {"p1", "x"} <= set((span.attributes or {}).values())
    finally:
        _runtime.detach(token)


@compiled
def test_the_compiled_exit_applies_to_scopes_only() -> None:
    """``ScopeCore.__exit__`` read from the class is a function of a scope and the three
    exception values (as ``contextlib.ExitStack`` calls it); anything else is a TypeError."""
    exit_function: Any = _accel.speedups.ScopeCore.__exit__
    with pytest.raises(TypeError, match="scope"):
        exit_function(object(), None, None, None)
    with pytest.raises(TypeError):
        exit_function(BRIDGE.scope(plain="a"))
    scope = BRIDGE.scope(plain="a")
    leave: Any = scope.__exit__
    with pytest.raises(TypeError):
        leave(None, None)
    exit_function(BRIDGE.scope(plain="a"), None, None, None)  # never entered: nothing to do


@compiled
def test_a_compiled_state_refuses_what_would_corrupt_it() -> None:
    """The compiled state refuses deleting its frame and replacing its values (the C code
    reads them without checks), where Python's slots would only fail later."""
    with BRIDGE.scope(plain="p"):
        state: Any = _runtime.get_current()[BRIDGE._key]
        with pytest.raises(AttributeError):
            del state.frame
        with pytest.raises(AttributeError):
            state.local = {}
        with pytest.raises(AttributeError):
            state.generation = 7
        assert BRIDGE.get("plain") == "p"
        with BRIDGE.scope(renamed="r"):
            assert BRIDGE.current() == {"plain": "p", "renamed": "r"}


@compiled
def test_the_compiled_module_is_loaded_once_and_keeps_serving() -> None:
    """Importing the compiled module again (or in a subinterpreter) is refused with an
    ImportError, which the package treats as "not built"; the loaded one keeps working."""
    import importlib.util

    spec = importlib.util.find_spec("otel_ctxbridge._speedups")
    assert spec is not None
    assert spec.loader is not None
    with pytest.raises(ImportError, match="once"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    bridge = _bridge()
    with bridge.scope(plain="a"):
        assert bridge.get("plain") == "a"


def test_scope_and_get_show_the_same_signature_compiled_or_not() -> None:
    """inspect.signature() of bridge.scope and bridge.get is the methods' (without self),
    also when they are the compiled callables."""
    import inspect
    from inspect import Parameter

    bridge = _bridge()
    scope = inspect.signature(bridge.scope).parameters
    assert [(p.name, p.kind) for p in scope.values()] == [("values", Parameter.VAR_KEYWORD)]
    get = inspect.signature(bridge.get).parameters
    assert list(get) == ["name", "default"]
    assert get["default"].default is None


def test_patching_scope_or_get_on_the_class_reaches_every_bridge() -> None:
    """mock.patch.object(ContextBridge, "get"/"scope") is honoured by bridges made before
    the patch and inside it, compiled or not, and undone with the patch."""
    from unittest import mock

    before = _bridge()
    with before.scope(plain="p"):
        with mock.patch.object(cb.ContextBridge, "get", return_value="mocked") as get:
            inside = _bridge()
            assert before.get("plain") == "mocked"
            assert inside.get("plain") == "mocked"
        assert get.call_count == 2
        assert before.get("plain") == "p"
        original = cb.ContextBridge.scope
        seen: list[dict[str, Any]] = []

        def spy(self: cb.ContextBridge, /, **values: Any) -> Any:
            seen.append(values)
            return original(self, **values)

        with mock.patch.object(cb.ContextBridge, "scope", spy), before.scope(renamed="r"):
            assert before.get("renamed") == "r"
        assert seen == [{"renamed": "r"}]
        with before.scope(renamed="s"):
            assert before.get("renamed") == "s"
        assert seen == [{"renamed": "r"}]


@compiled
def test_a_compiled_module_refusing_this_opentelemetry_is_skipped_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """When the compiled module refuses its configuration (an OpenTelemetry it does not
    know), the package says so on its logger and runs on the Python code; importing it
    never fails for the sake of the accelerator."""

    def refuse(**kwargs: Any) -> None:
        raise TypeError("context_type must be a dict subclass")

    monkeypatch.setattr(_accel.speedups, "configure", refuse)
    try:
        with caplog.at_level("WARNING", logger="otel_ctxbridge"):
            assert _scope._configured() is None
        assert "accelerator is not used (context_type must be a dict subclass)" in caplog.text
    finally:
        monkeypatch.undo()
        assert _scope._configured() is _accel.speedups


def test_a_field_named_self_works_like_any_other() -> None:
    """scope() and update() take their values as keywords only, so a field may be named
    like their first parameter."""
    bridge = cb.ContextBridge([cb.Field("self")])
    with bridge.scope(self="me"):
        assert bridge.get("self") == "me"
        bridge.update(self="you")
        assert bridge.get("self") == "you"


@pytest.mark.parametrize("core", ["compiled", "compiled in a with block", "python"])
def test_an_interrupt_while_stamping_leaves_no_context_attached(
    core: str, monkeypatch: pytest.MonkeyPatch, spans: Any
) -> None:
    """When stamping the span is interrupted (KeyboardInterrupt), the scope is not entered
    and nothing stays attached: a with-statement would not call __exit__."""
    if core != "python" and _accel.speedups is None:
        pytest.skip("the accelerator is not built or is switched off")

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    from opentelemetry import trace

    monkeypatch.setattr(_scope, "stamp", interrupted)
    if _accel.speedups is not None:
        _scope._configured()  # the compiled core calls the stamp it was given
    try:
        before = _runtime.get_current()
        with trace.get_tracer("t").start_as_current_span("s"):
            inside = _runtime.get_current()
            scope = (
                _scope.PyScopeCore(BRIDGE, {"plain": "a"})
                if core == "python"
                else BRIDGE.scope(plain="a")
            )
            with pytest.raises(KeyboardInterrupt):
                if core == "compiled in a with block":
                    with scope:
                        pytest.fail("the body of a scope that was not entered ran")
                else:
                    scope.__enter__()
            assert _runtime.get_current() is inside
        assert _runtime.get_current() is before
    finally:
        monkeypatch.undo()
        if _accel.speedups is not None:
            _scope._configured()


ROOT = Path(__file__).resolve().parent.parent


def _build_wheel(out: Path, **env: str) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
        env={
            **os.environ,
            "OTEL_CTXBRIDGE_NO_EXTENSIONS": "",
            "OTEL_CTXBRIDGE_REQUIRE_EXTENSIONS": "",
            **env,
        },
        check=True,
        timeout=300,
        capture_output=True,
    )
    (wheel,) = out.glob("*.whl")
    return wheel


wheels = pytest.mark.skipif(
    bool(os.environ.get("OTEL_CTXBRIDGE_NO_EXTENSIONS")),
    reason="wheels are built once, in the run with the accelerator",
)


@wheels
def test_a_wheel_built_without_a_c_compiler_is_pure_python_and_works(tmp_path: Path) -> None:
    """Installing from source where no C compiler works still succeeds: the build falls
    back to a pure-Python wheel, and the package runs from it on the Python code."""
    wheel = _build_wheel(tmp_path / "wheel", CC="/bin/false")  # setuptools compiles with $CC
    assert wheel.name.endswith("-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert not [n for n in archive.namelist() if n.endswith((".so", ".pyd", ".c"))]
        archive.extractall(tmp_path / "site")
    probe = (
        "import otel_ctxbridge as cb\n"
        "from otel_ctxbridge import _accel\n"
        "bridge = cb.ContextBridge([cb.Field('tenant_id')])\n"
        "with bridge.scope(tenant_id='acme'):\n"
        "    print(_accel.speedups is None, bridge.get('tenant_id'))\n"
    )
    ran = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.stdout.split() == ["True", "acme"]


@wheels
@pytest.mark.skipif(
    _accel.speedups is None and os.environ.get("CI") != "true",
    reason="no compiled module here: this machine may have no C compiler",
)
def test_a_wheel_built_with_a_c_compiler_carries_the_accelerator(tmp_path: Path) -> None:
    """With a compiler, the wheel is platform-specific and holds the compiled module (not
    its C source)."""
    wheel = _build_wheel(tmp_path / "wheel")
    assert "-py3-none-any" not in wheel.name
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert [n for n in names if n.startswith("otel_ctxbridge/_speedups.") and ".so" in n]
    assert "otel_ctxbridge/_speedups.c" not in names


def _span_cases() -> Iterator[tuple[str, Any, str]]:
    """(case, a span in that state, its name): spans the direct write handles, and spans it
    must leave to the public path (limits that apply, an object that is not an SDK span)."""
    from opentelemetry.sdk.trace import SpanLimits, TracerProvider

    tracer = TracerProvider().get_tracer("t")
    yield "fresh", tracer.start_span("GET /items/7", attributes={"a": "1"}), "GET /items/7"
    ended = tracer.start_span("GET /items/7")
    ended.end()
    yield "ended", ended, "GET /items/7"
    renamed = tracer.start_span("GET /items/7")
    renamed.update_name("chosen by the app")
    yield "renamed", renamed, "GET /items/7"
    full = TracerProvider(span_limits=SpanLimits(max_span_attributes=1)).get_tracer("t")
    yield "count limit", full.start_span("GET /x", attributes={"a": "1"}), "GET /x"
    short = TracerProvider(span_limits=SpanLimits(max_span_attribute_length=3)).get_tracer("t")
    yield "length limit", short.start_span("GET /x"), "GET /x"


def _span_state(span: Any) -> tuple[str, dict[str, Any], int]:
    return span.name, dict(span.attributes), span.dropped_attributes


@compiled
@pytest.mark.parametrize("mode", ["write", "keep", "rename"])
def test_compiled_span_write_matches_python(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """The compiled direct write (``write_span``) leaves each span exactly as the Python
    code does: attributes written (over the span's own, or only where it has none), the
    span renamed with its route only while it keeps the expected name, an ended span
    untouched, and limits that apply left to the SDK's public path."""
    from otel_ctxbridge import _span_write

    fields = {"app.tenant": "acme", "a": "2"}  # "a": the fresh span has "1"

    def act(span: Any, named: str) -> None:
        attributes = {"http.route": "/items/{item_id}", **fields}
        if mode == "rename":
            _span_write.rename_span(span, named, "GET /items/{item_id}", attributes)
        else:
            _span_write.write_attributes(span, attributes, overwrite=mode == "write")

    compiled_states = []
    for _, span, named in _span_cases():
        act(span, named)
        compiled_states.append(_span_state(span))
    monkeypatch.setattr(_span_write, "_write_span", None)
    python_states = []
    for _, span, named in _span_cases():
        act(span, named)
        python_states.append(_span_state(span))
    assert compiled_states == python_states
    fresh = dict(zip([case for case, _, _ in _span_cases()], compiled_states, strict=True))
    assert fresh["fresh"][1]["http.route"] == "/items/{item_id}"
    assert fresh["fresh"][1]["a"] == ("1" if mode == "keep" else "2")
    assert fresh["fresh"][0] == ("GET /items/{item_id}" if mode == "rename" else "GET /items/7")
    assert fresh["ended"][1] == {}
    assert fresh["renamed"][0] == "chosen by the app"
    assert (fresh["renamed"][1] == {}) is (mode == "rename")  # renamed since: left alone
    assert fresh["length limit"][1]["app.tenant"] == "acm"  # truncated by the SDK


@compiled
def test_compiled_span_write_refuses_what_it_does_not_know() -> None:
    """``write_span`` says False (the caller takes the public path) for objects that are not
    SDK spans or attributes that are not a dict, and never raises for a missing attribute."""
    from opentelemetry.sdk.trace import TracerProvider

    write_span = _accel.speedups.write_span  # type: ignore[union-attr] # compiled: loaded
    span = TracerProvider().get_tracer("t").start_span("s")
    assert write_span(object(), {"a": "b"}, True, None, None, None) is False
    assert write_span(span, [("a", "b")], True, None, None, None) is False
    assert write_span(span, {"a": "b"}, True, "s", 42, {}) is False  # a name that is not text
    assert write_span(span, {"a": "b"}, True, "s", "t", [("c", "d")]) is False  # not a dict
    assert write_span(span, {"a": "b"}, True, None, None, None) is True
    assert dict(span.attributes) == {"a": "b"}
    with pytest.raises(TypeError):
        write_span(span, {"a": "b"})


@pytest.mark.parametrize("held", ["span", "store"])
def test_span_write_waits_for_a_lock_another_thread_holds(held: str) -> None:
    """While another thread holds the span's lock (``end()``, the SDK's writes) or its
    store's (``BoundedAttributes``' deepcopy), the direct write waits for it instead of
    writing under it (the compiled path skips only locks nobody holds)."""
    from opentelemetry.sdk.trace import TracerProvider

    from otel_ctxbridge._span_write import write_attributes

    span: Any = TracerProvider().get_tracer("t").start_span("s")
    lock = span._lock if held == "span" else span._attributes._lock
    with lock:
        writer = threading.Thread(target=write_attributes, args=(span, {"app.tenant": "acme"}))
        writer.start()
        writer.join(0.3)
        assert writer.is_alive()  # waiting for the lock
        assert "app.tenant" not in span._attributes._dict
    writer.join(10)
    assert not writer.is_alive()
    assert span.attributes["app.tenant"] == "acme"


def test_span_write_takes_the_locks_when_a_replaced_value_could_run_code() -> None:
    """A value the application put on the span that runs code when released (a ``str``
    subclass with ``__del__``) is replaced under the span's lock: the write skips only locks
    no thread could need, and only when nothing it does runs Python code."""
    from opentelemetry.sdk.trace import TracerProvider

    from otel_ctxbridge._span_write import write_attributes

    span: Any = TracerProvider().get_tracer("t").start_span("s")
    held_while_released: list[bool] = []

    class Tracked(str):
        __slots__ = ()

        def __del__(self) -> None:
            held_while_released.append(span._lock.locked())

    span.set_attribute("app.tenant", Tracked("old"))
    write_attributes(span, {"app.tenant": "new"})
    assert held_while_released == [True]
    assert span.attributes["app.tenant"] == "new"


_HEADER_NAMES = st.sampled_from(
    [b"host", b"traceparent", b"tracestate", b"baggage", b"x-request-id", b"X-Request-ID", b"a\\b"]
)
_HEADER_LISTS = st.lists(
    st.tuples(_HEADER_NAMES | st.binary(max_size=12), st.binary(max_size=12)), max_size=8
)


@compiled
@settings(max_examples=300)
@given(headers=_HEADER_LISTS, names=st.frozensets(_HEADER_NAMES, max_size=3))
def test_compiled_header_loops_match_python(
    headers: list[tuple[bytes, bytes]], names: frozenset[bytes]
) -> None:
    """The compiled header loops answer as the Python ones: which wanted headers a request
    has (values in order; a name not in lower case leaves it to the Python loop, which lowers
    names), and the echo appended unless the application set the header (any case). (Which
    headers need the shield: ``test_compiled_trace_headers_match_python``.)"""
    speedups: Any = _accel.speedups
    expected: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        if name in names:
            expected.setdefault(name, []).append(value)
    found = speedups.collect_headers(headers, names)
    if any(name != name.lower() for name, _ in headers):
        assert found is NotImplemented
    else:
        assert found == (expected or None)

    message: dict[str, Any] = {"type": "http.response.start", "headers": list(headers)}
    assert speedups.append_header(message, b"x-request-id", b"rid") is True
    if any(name.lower() == b"x-request-id" for name, _ in headers):
        assert message["headers"] == headers
    else:
        assert message["headers"] == [*headers, (b"x-request-id", b"rid")]


@compiled
def test_compiled_header_loops_leave_other_shapes_to_python() -> None:
    """Headers that are not a list or tuple of (bytes, bytes) tuples (lists of lists, a
    generator, text) get "not mine" from the compiled loops, and the Python code handles them."""
    from otel_ctxbridge import _shield

    speedups: Any = _accel.speedups
    names = frozenset({b"baggage"})
    for odd in ([[b"baggage", b"a=b"]], ((b"baggage", "a=b"),), (h for h in [(b"a", b"b")])):
        assert speedups.trace_headers(odd, names) is None
        assert speedups.collect_headers(odd, names) is NotImplemented
        assert speedups.append_header({"headers": odd}, b"x-request-id", b"r") is None
    assert _shield.trace_headers([[b"baggage", b"a=b"]], names) is None  # the full path
    assert speedups.append_header({}, b"x-request-id", b"r") is True
    assert speedups.append_header({"headers": None}, b"x-request-id", b"r") is True


@compiled
@settings(max_examples=300)
@given(headers=_HEADER_LISTS, others=st.frozensets(_HEADER_NAMES, max_size=2))
def test_compiled_trace_headers_match_python(
    headers: list[tuple[bytes, bytes]], others: frozenset[bytes]
) -> None:
    """``trace_headers`` finds the ``traceparent`` and ``tracestate`` values in order, and
    says None when a header is named in ``others``, has a name not in lower case or has a
    backslash (the shield's full path then), as the Python loop it stands for."""
    speedups: Any = _accel.speedups
    expected: Any = (
        [v for n, v in headers if n == b"traceparent"],
        [v for n, v in headers if n == b"tracestate"],
    )
    if any(n in others or b"\\" in n or b"\\" in v or n != n.lower() for n, v in headers):
        expected = None
    for shape in (headers, tuple(headers)):
        found = speedups.trace_headers(shape, others)
        assert (None if found is None else tuple(list(v) for v in found)) == expected
    assert speedups.trace_headers([[b"a", b"b"]], others) is None


_HEX = "0123456789abcdefABCDEF-g "
_TRACEPARENTS = st.one_of(
    st.builds(
        lambda version, trace, parent, flags: f"{version}-{trace}-{parent}-{flags}",
        st.sampled_from(["00", "01", "ff", "0A", "0"]),
        st.text(_HEX, min_size=31, max_size=33) | st.just("0" * 32),
        st.text(_HEX, min_size=15, max_size=17) | st.just("0" * 16),
        st.text(_HEX, min_size=1, max_size=3),
    ),
    st.just("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
    st.text(max_size=60),
)


@compiled
@settings(max_examples=500)
@given(value=_TRACEPARENTS)
def test_compiled_traceparent_ready_matches_the_parser(value: str) -> None:
    """``traceparent_ready`` says True exactly when ``parse_traceparent`` returns the value
    unchanged (already normalised: the shield lets OTel read it as it came), for valid,
    nearly valid (upper case, wrong lengths, zero ids, other versions) and random values."""
    from otel_ctxbridge.tracecontext import parse_traceparent

    speedups: Any = _accel.speedups
    raw = value.encode("utf-8", "surrogatepass")
    text = raw.decode("latin-1")
    assert speedups.traceparent_ready(raw) is (parse_traceparent([text]) == text)
    assert speedups.traceparent_ready(text) is False  # not bytes: the Python path decides
