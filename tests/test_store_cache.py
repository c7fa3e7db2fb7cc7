"""The read cache behind get() and current(): it speeds up repeated reads of one context and
never shows a value older than a finished update(), nor another context's values."""

from __future__ import annotations

import threading

import pytest

import otel_ctxbridge as cb


def test_repeated_reads_see_an_update_made_in_another_thread(bridge: cb.ContextBridge) -> None:
    """Reads cached for the scope's context still show a thread's update() once it returned."""
    with bridge.scope(request_id="r-1", tenant_id="acme"):
        for _ in range(3):  # cached from the second read on
            assert bridge.get("tenant_id") == "acme"
        assert bridge.current() == {"request_id": "r-1", "tenant_id": "acme"}
        worker = threading.Thread(target=bridge.bind(lambda: bridge.update(tenant_id="beta")))
        worker.start()
        worker.join()
        assert bridge.get("tenant_id") == "beta"
        assert bridge.current()["tenant_id"] == "beta"
        assert bridge.get("user_id", "nobody") == "nobody"


def test_reads_alternating_between_contexts_each_see_their_own(bridge: cb.ContextBridge) -> None:
    """Reading in turn from two scopes (as interleaved tasks do) gives each scope's values."""
    outer = bridge.scope(request_id="r-outer", user_id="u-1")
    inner = bridge.scope(request_id="r-inner")
    with outer:
        read_outer = bridge.bind(lambda: (bridge.get("request_id"), bridge.get("user_id")))
        with inner:
            read_inner = bridge.bind(lambda: (bridge.get("request_id"), bridge.get("user_id")))
    for _ in range(5):
        assert read_outer() == ("r-outer", "u-1")
        assert read_inner() == ("r-inner", "u-1")
        assert read_inner() == ("r-inner", "u-1")  # twice in a row: now cached
    assert bridge.get("request_id") is None


def test_an_unknown_field_is_refused_also_when_the_context_is_cached(
    bridge: cb.ContextBridge,
) -> None:
    """The cache does not turn a misspelt field name into a silent default."""
    with bridge.scope(request_id="r-1"):
        bridge.get("request_id")
        bridge.get("request_id")
        with pytest.raises(cb.UnknownFieldError, match="tenant"):
            bridge.get("tenant")


def test_a_cached_read_never_lags_behind_a_finished_update(bridge: cb.ContextBridge) -> None:
    """One thread updates a counter in a loop while another keeps reading it: every read
    shows at least the last update that had returned before the read began."""
    finished = [-1]
    stop = threading.Event()
    errors: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            floor = finished[0]
            value = int(bridge.get("user_id", "-1"))
            if value < floor:
                errors.append(f"read {value} after update {floor} had returned")
                return

    def writer() -> None:
        for number in range(3000):
            bridge.update(user_id=str(number))
            finished[0] = number
        stop.set()

    with bridge.scope(request_id="r-1"):
        threads = [threading.Thread(target=bridge.bind(fn)) for fn in (reader, reader, writer)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert not errors, errors[0]
    assert stop.is_set()
