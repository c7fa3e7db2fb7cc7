"""The README's quick start runs as pasted and prints what its comments say."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_quick_start_runs_as_pasted(tmp_path: Path) -> None:
    """The first Python block of the README (the quick start) runs in a fresh interpreter and
    prints the tenant's orders, then the tenant read back through plain OTel baggage."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    script = tmp_path / "quickstart.py"
    script.write_text(blocks[0], encoding="utf-8")
    ran = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert ran.stdout.splitlines() == ["orders of acme for u-7", "acme"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_for(port: int, server: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"uvicorn exited: {server.communicate()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("uvicorn did not start")


APP = """
import logging

from fastapi import FastAPI

import otel_ctxbridge as cb

bridge = cb.ContextBridge([
    cb.Field("request_id", header="x-request-id", generate=cb.new_request_id, inbound="always"),
    cb.Field("tenant_id", header="x-tenant-id"),
    cb.Field("user_id", propagate=False),
])
{recipe}
telemetry = cb.configure(bridge, otlp=False)
api = FastAPI()


@api.get("/hello")
def hello() -> dict[str, bool]:
    logging.getLogger("myapp").info("hello")
    return {{"ok": True}}


@api.get("/boom")
def boom() -> None:
    raise RuntimeError("boom")


app = cb.instrument_asgi(api, bridge)
"""


def test_the_json_log_recipe_holds_under_uvicorns_command_line(tmp_path: Path) -> None:
    """The README's JSON logging recipe, in an app module run by ``uvicorn myapp:app`` (whose
    command line sets up its own text logging first): every line on stdout is one JSON object,
    and the app's line, uvicorn's access line and uvicorn's traceback of an unhandled exception
    carry their request's id; nothing is written as text on stderr."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    (recipe,) = [b for b in blocks if "pythonjsonlogger" in b]
    (tmp_path / "myapp.py").write_text(APP.format(recipe=recipe), encoding="utf-8")
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "myapp:app", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(port, server)
        assert httpx.get(f"http://127.0.0.1:{port}/hello", headers={"x-request-id": "r-cli"})
        failed = httpx.get(f"http://127.0.0.1:{port}/boom", headers={"x-request-id": "r-boom"})
        assert failed.status_code == 500
    finally:
        server.send_signal(signal.SIGINT)
        out, err = server.communicate(timeout=30)
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    by_logger: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        by_logger.setdefault(line["logger"], []).append(line)
    (hello,) = by_logger["myapp"]
    assert hello["request_id"] == "r-cli"
    access = {line["message"].split('"')[1]: line for line in by_logger["uvicorn.access"]}
    assert access["GET /hello HTTP/1.1"]["request_id"] == "r-cli"
    (traceback,) = [x for x in by_logger["uvicorn.error"] if "Exception in" in x["message"]]
    assert traceback["request_id"] == "r-boom"
    assert traceback["trace_id"]
    assert err.strip() == "", err
