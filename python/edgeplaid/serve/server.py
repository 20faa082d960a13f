"""uvicorn, configured against slow and idle clients.

uvicorn closes a connection that stays idle between requests (``timeout_keep_alive``), but it has
no deadline for a request itself: a client may send its headers or its body a byte at a time, or
connect and send nothing, and hold the connection open for as long as it likes. The protocol
below gives every request a deadline: from the moment the server waits for it (the connection
opened, or the previous response sent) its head and body must have arrived within
``request_timeout_s``, else the connection is closed. The event loop never waits on a client, so
``/healthz`` keeps answering while such connections come and go.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a per-request deadline (``request_timeout_s``, set on the
    class by :func:`uvicorn_config`)."""

    request_timeout_s: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.request_timeout_s, self._expire)

    def _disarm(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        # DONE: the whole request is in (it is being answered, however long that takes).
        if self.conn.their_state is not h11.DONE and not self.transport.is_closing():
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is h11.DONE:
            self._disarm()

    def on_response_complete(self) -> None:
        # Armed first: the base method may go on to a pipelined request already received, whose
        # handle_events then disarms it.
        self._arm()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def uvicorn_config(app: Any, host: str = "127.0.0.1", port: int = 8000, **kwargs: Any) -> uvicorn.Config:
    """uvicorn's Config for ``app`` (from :func:`edgeplaid.serve.create_app`): its
    ``request_timeout_s`` and ``keep_alive_s`` (``app.state.config``) as the request deadline
    and the idle keep-alive limit. ``kwargs`` go to uvicorn.Config (log_level, ...)."""
    cfg = app.state.config
    # A subclass per server: the deadline is a class attribute (uvicorn instantiates the
    # protocol itself, with no room for extra arguments).
    protocol = type("DeadlineH11", (DeadlineH11Protocol,), {"request_timeout_s": cfg.request_timeout_s})
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol,
        timeout_keep_alive=cfg.keep_alive_s,
        **kwargs,
    )
