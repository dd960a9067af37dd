"""The feedback app under uvicorn in a background thread: for the demo and the tests.

The socket is bound before the server starts (port 0 = any free port), so there is no race
between picking a port and listening on it.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn

from rlhfkit.feedback.app import create_app
from rlhfkit.feedback.settings import ServeConfig


class LiveServer:
    def __init__(self, config: ServeConfig, db: Any | None = None):
        self.app = create_app(config, db)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, log_level="warning", timeout_keep_alive=30, proxy_headers=False)
        )
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()
