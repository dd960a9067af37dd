"""What each process of `rlhfkit serve workers=N` runs (uvicorn imports this module in each).

The settings come from the parent in $RLHFKIT_SERVE_CONFIG (JSON). With several workers uvicorn
binds the listening socket itself, as `socket.socket(AF_INET)` (protocol 0), and asyncio then
leaves Nagle's algorithm on for the connections it accepts: a response written in two pieces
waits for the client's delayed ACK, ~40 ms per request. NoDelayProtocol turns Nagle off again.
"""

from __future__ import annotations

import asyncio
import os
import socket

from fastapi import FastAPI
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from rlhfkit.feedback.app import create_app
from rlhfkit.feedback.settings import ServeConfig

CONFIG_ENV = "RLHFKIT_SERVE_CONFIG"


def app() -> FastAPI:
    """The app of one worker process (uvicorn's factory)."""
    return create_app(ServeConfig.model_validate_json(os.environ[CONFIG_ENV]))


class NoDelayProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's HTTP protocol with TCP_NODELAY on each connection (see the module docstring)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)
