"""A live ``moekit serve`` app for the server tests: uvicorn on 127.0.0.1 at a free port, in a thread."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from types import SimpleNamespace

import uvicorn

from moekit.serve.server import create_app


@contextlib.contextmanager
def live_server(engine, model_name: str = "tiny", **app_options):
    """uvicorn serving ``create_app(engine, **app_options)`` on 127.0.0.1 at a free port, in a thread; the engine
    shut down after."""
    app = create_app(engine, model_name, **app_options)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{sock.getsockname()[1]}", app=app, engine=engine)
    finally:
        server.should_exit = True
        thread.join(30)
        if hasattr(engine, "shutdown"):
            engine.shutdown(drain=False)
