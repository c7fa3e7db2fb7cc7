"""``make demo`` runs ``python examples/demo.py``: here that same entry point runs as a process
(collector, sink and both services for real), its exit code and report are checked, and no
process it started outlives it, on success and when it is interrupted."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests._services import IN_CI

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo.py"
TIMEOUT = 90
MARKERS = {
    "collector": "rotel-agent",
    "gateway": "gateway_service.py",
    "orders-downstream": "downstream_orders_service.py",
}
"""What the demo starts (its report's names) and a text in each one's command line."""
RUN_WITH_CTRL_C = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv = sys.argv[1:]; sys.path.insert(0, sys.argv[0].rpartition('/')[0]); "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)
"""Runs the demo script as ``python demo.py`` would, with Ctrl-C handled even when this test
run ignores SIGINT (a background job does, and its children inherit that)."""


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}


def _demo_module() -> Any:
    sys.path.insert(0, str(DEMO.parent))
    try:
        import demo
    finally:
        sys.path.remove(str(DEMO.parent))
    return demo


def _skip_without_collector(stderr: str) -> None:
    if "could not start the collector" in stderr:
        if IN_CI:
            pytest.fail(f"the rotel collector must run in CI:\n{stderr}")
        pytest.skip(f"rotel-agent cannot start in this environment:\n{stderr[-500:]}")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int, marker: str) -> bool:
    """True while process ``pid`` runs and is the one started (``marker`` in its command line;
    a pid reused by another program does not count, nor a zombie: it runs nothing)."""
    return marker in _cmdline(pid)


def _children(pid: int) -> dict[int, str]:
    """Direct children of ``pid``: {pid: command line}."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found[int(entry.name)] = _cmdline(int(entry.name))
    return found


def _gone_within(processes: dict[int, str], timeout: float = 10.0) -> dict[int, str]:
    """The processes still alive after ``timeout`` seconds (bounded wait)."""
    deadline = time.monotonic() + timeout
    alive = dict(processes)
    while alive and time.monotonic() < deadline:
        alive = {p: m for p, m in alive.items() if _alive(p, m)}
        time.sleep(0.05)
    return alive


def test_demo_exits_zero_reports_every_request_id_and_leaves_no_process() -> None:
    """``examples/demo.py`` (what ``make demo`` runs) exits 0, reports every one of its six
    request ids as complete (the three sent by the client by name, three generated), including
    the failing request's 500, and the collector and both services it started are gone after."""
    # The examples' own settings in the caller's environment would change what the demo shows
    # (no baggage downstream, a dead partner): the demo must not inherit them.
    stray = {"GATEWAY_EGRESS_HOSTS": "nowhere.invalid", "PARTNER_URL": "http://127.0.0.1:9/"}
    proc = subprocess.run(
        [sys.executable, str(DEMO)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**_env(), **stray},
        check=False,
    )
    _skip_without_collector(proc.stderr)
    out = proc.stdout
    assert proc.returncode == 0, f"{out}\n{proc.stderr}"
    ids = re.findall(r"^request id (\S+)", out, flags=re.MULTILINE)
    assert len(set(ids)) == 6, out
    assert {"demo-checkout-1", "demo-checkout-3", "demo-checkout-fail"} <= set(ids)
    generated = [i for i in ids if not i.startswith("demo-")]
    assert all(re.fullmatch(r"[0-9a-f-]{36}", i) for i in generated)
    assert len(generated) == 3
    assert out.count("\n  complete\n") == 6
    assert "GET /checkout/fail -> 500" in out
    assert "OK: all 6 request ids" in out
    assert "LEAKED" not in out
    assert "MISSING" not in out
    assert out.count("never left the gateway") == 6

    header = re.findall(r"^  (\S+)\s+(?:rotel-agent )?pid (\d+)", out, flags=re.MULTILINE)
    started = {int(pid): MARKERS[name] for name, pid in header}
    assert sorted(started.values()) == sorted(MARKERS.values()), out
    assert not _gone_within(started)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupted_demo_stops_every_process_it_started(signum: int) -> None:
    """Ctrl-C (SIGINT) or SIGTERM while the demo starts its services: it exits 130 and the
    collector and services it had started are all gone."""
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN_WITH_CTRL_C, str(DEMO)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        children: dict[int, str] = {}
        deadline = time.monotonic() + TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            children = _children(proc.pid)
            if any("gateway_service.py" in cmd for cmd in children.values()):
                break
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signum)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _skip_without_collector(err)
    assert proc.returncode == 130, f"{out}\n{err}"
    assert any("rotel-agent" in cmd for cmd in children.values()), children
    assert any("gateway_service.py" in cmd for cmd in children.values()), children
    started = {pid: m for pid, cmd in children.items() for m in MARKERS.values() if m in cmd}
    assert not _gone_within(started)


def test_demo_exits_one_naming_what_is_missing_when_the_downstream_gets_no_ids() -> None:
    """Propagation broken on purpose (the gateway's egress policy allows no host, so the
    downstream gets no baggage): the demo reports each request's missing downstream span and
    log record, exits 1, and still leaves no process behind."""
    script = (
        "import sys, tempfile, pathlib; sys.path.insert(0, sys.argv[1]); import demo; "
        "d = tempfile.mkdtemp(); "
        "sys.exit(demo.run(pathlib.Path(d), env={'GATEWAY_EGRESS_HOSTS': 'nowhere.invalid'},"
        " wait=2))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(DEMO.parent)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=_env(),
        check=False,
    )
    if "CollectorStartError" in proc.stderr:
        _skip_without_collector("could not start the collector")
    out = proc.stdout
    assert proc.returncode == 1, f"{out}\n{proc.stderr}"
    missing = "MISSING: orders-downstream server span, orders-downstream log record"
    assert out.count(missing) == 6, out
    assert "FAILED: 6 of 6 request ids incomplete" in out
    assert "OK:" not in out
    header = re.findall(r"^  (\S+)\s+(?:rotel-agent )?pid (\d+)", out, flags=re.MULTILINE)
    started = {int(pid): MARKERS[name] for name, pid in header}
    assert sorted(started.values()) == sorted(MARKERS.values()), out
    assert not _gone_within(started)


def _records(user_keys: tuple[str, ...] = (), tenant: str = "acme") -> tuple[list[Any], list[Any]]:
    """What the collector forwards for one complete request ``r-1`` of tenant ``tenant``."""
    trace_id = "ab" * 16
    keys = ["request_id", "tenant_id", *user_keys]

    def record(service: str, **fields: Any) -> dict[str, Any]:
        return {"service": service, "trace_id": trace_id, **fields}

    gateway_ids = {"app.request_id": "r-1", "app.tenant_id": "acme", "app.user_id": "alice"}
    spans = [
        record("gateway", kind="SERVER", name="GET /checkout/1", attributes=gateway_ids),
        record("gateway", kind="CLIENT", name="GET", attributes=gateway_ids),
        record(
            "orders-downstream",
            kind="SERVER",
            name="GET /orders/1",
            attributes={"request_id": "r-1", "tenant_id": tenant, "orders.baggage_keys": keys},
        ),
    ]
    logs = [
        record("gateway", body="checkout of order 1", severity="INFO", attributes=gateway_ids),
        record(
            "gateway", body="GET /checkout/1 200 3.1ms", severity="INFO", attributes=gateway_ids
        ),
        record(
            "orders-downstream",
            body="order 1 requested: request_id=r-1",
            severity="INFO",
            attributes={"request_id": "r-1", "tenant_id": tenant},
        ),
    ]
    return spans, logs


@pytest.mark.parametrize(
    ("user_keys", "tenant", "problem"),
    [
        ((), "acme", None),
        (("user_id",), "acme", "the user id kept in the gateway"),
        ((), "globex", "the tenant in the downstream's baggage"),
        ((), "no-access-log", "the gateway's access-log line"),
    ],
    ids=[
        "complete",
        "user-id-in-downstream-baggage",
        "wrong-tenant-downstream",
        "no-access-log-line",
    ],
)
def test_demo_verdict_catches_a_leaked_user_id_and_a_wrong_tenant(
    user_keys: tuple[str, ...], tenant: str, problem: str | None
) -> None:
    """The demo's verdict on one request: complete when every record carries the id, the
    downstream read the tenant sent and got no process-local field; a ``user_id`` baggage entry
    reaching the downstream (even without its value in any record) is reported as a leak, and
    a tenant other than the one sent as missing."""
    demo = _demo_module()
    headers = {"x-request-id": "r-1", "x-tenant-id": "acme", "x-user": "alice"}
    sent = demo.Sent("/checkout/1", headers, 200, "r-1")
    if tenant == "no-access-log":
        sent.spans, sent.logs = _records(user_keys, "acme")
        sent.logs = [r for r in sent.logs if not str(r["body"]).startswith("GET ")]
    else:
        sent.spans, sent.logs = _records(user_keys, tenant)
    missing = sent.missing()
    if problem is None:
        assert missing == []
        assert "never left the gateway" in demo.report(sent)
    else:
        assert any(problem in m for m in missing), missing
        assert "MISSING" in demo.report(sent)
    assert ("LEAKED" in demo.report(sent)) is bool(user_keys)
