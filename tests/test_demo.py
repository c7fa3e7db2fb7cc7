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

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
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
    proc = subprocess.run(
        [sys.executable, str(DEMO)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=_env(),
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
