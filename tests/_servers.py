"""Run an ASGI app under a real uvicorn server on 127.0.0.1 for HTTP tests.

API (small on purpose; other test modules may use it):

- ``serve(app, **config) -> ContextManager[str]``: start uvicorn in a thread on a free
  127.0.0.1 port, yield the base URL (``"http://127.0.0.1:PORT"``), stop it on exit. ``config``
  goes to ``uvicorn.Config`` (defaults: ``log_config=None`` so the test's logging setup stays
  as it is, ``access_log=False``, ``lifespan="auto"``, ``timeout_keep_alive=60``).
- ``free_port() -> int``: a port that was free on 127.0.0.1 a moment ago (for subprocesses).
- ``wait_for_port(port, timeout=10.0, process=None)``: block until something accepts on
  127.0.0.1:``port``; raises ``RuntimeError`` if ``process`` (a ``subprocess.Popen``) exits or
  the time runs out.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

__all__ = ["free_port", "serve", "wait_for_port"]

_START_TIMEOUT = 10.0


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 when asked."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(
    port: int, timeout: float = _START_TIMEOUT, process: subprocess.Popen[Any] | None = None
) -> None:
    """Wait until 127.0.0.1:``port`` accepts connections."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server process exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listened on 127.0.0.1:{port} within {timeout}s")


@contextmanager
def serve(app: Any, **config: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a background thread; yield its base URL."""
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets created with it, and
    # without it every request waits ~40 ms on Nagle + delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # timeout_keep_alive: the client shares this process (and its GIL) with the server and, with
    # hundreds of requests in flight, may take longer than uvicorn's 5 s to send on a
    # keep-alive connection its pool has given a request; the server would close it under the
    # request (the client then reads a reset: httpx.ReadError). Servers outlive idle clients.
    options: dict[str, Any] = {
        "log_config": None,
        "access_log": False,
        "lifespan": "auto",
        "timeout_keep_alive": 60,
    }
    options.update(config)
    server = uvicorn.Server(uvicorn.Config(app, **options))
    errors: list[BaseException] = []

    def run() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # reported to the test below
            errors.append(exc)

    thread = threading.Thread(target=run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + _START_TIMEOUT
    while not server.started:
        if errors or not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError(f"uvicorn did not start: {errors!r}")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=_START_TIMEOUT)
        sock.close()
        if thread.is_alive():
            raise RuntimeError("uvicorn did not stop")
