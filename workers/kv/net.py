"""TCP plumbing for the KV data plane: tuned sockets, full sends, one-shot servers.

Every wait here is bounded: connections carry a timeout, ``send_buffers``
inherits the socket's, and ``OneShotServer`` bounds both accept and result.
"""
from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from workers.kv.codec import Buffer

SOCKET_BUFFER_BYTES = 4 << 20

T = TypeVar("T")



def tune_socket(sock: socket.socket) -> None:
    """TCP_NODELAY and large kernel buffers, best effort."""
    for level, option, value in (
        (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
        (socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES),
        (socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES),
    ):
        with contextlib.suppress(OSError):
            sock.setsockopt(level, option, value)


def connect(host: str, port: int, *, timeout: float) -> socket.socket:
    """A tuned TCP connection to a KV receiver; ``timeout`` bounds each wait."""
    sock = socket.create_connection((host, port), timeout=timeout)
    tune_socket(sock)
    return sock


def send_buffers(sock: socket.socket, buffers: list[Buffer]) -> int:
    """``sendmsg`` all of ``buffers``, resuming after partial sends; return bytes sent."""
    views = [memoryview(b).cast("B") for b in buffers]
    total = sum(len(v) for v in views)
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if sent:
            views[0] = views[0][sent:]
    return total


class OneShotServer(Generic[T]):
    """Listens on ``host:port``, accepts one connection in a thread and runs
    ``handler`` on it; ``result()`` returns what the handler returned or
    re-raises what it raised. The connection is closed after the handler."""

    def __init__(
        self, handler: Callable[[socket.socket], T], host: str = "127.0.0.1", port: int = 0,
        *, accept_timeout: float = 10.0,
    ) -> None:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tune_socket(self._listener)  # buffer sizes must precede listen() to scale the window
        self._listener.bind((host, port))
        self._listener.listen(1)
        self._listener.settimeout(accept_timeout)
        self.host, self.port = self._listener.getsockname()[:2]
        self._handler = handler
        self._result: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name=f"kv-serve-{self.port}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            with self._listener:
                conn, _ = self._listener.accept()
            with conn:
                tune_socket(conn)
                self._result = self._handler(conn)
        except BaseException as exc:  # handed to result()
            self._error = exc

    def result(self, timeout: float) -> T:
        """Wait up to ``timeout`` seconds for the handler's outcome."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"KV server on port {self.port} still running after {timeout}s")
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]


def serve_once(
    handler: Callable[[socket.socket], T], host: str = "127.0.0.1", port: int = 0,
    *, accept_timeout: float = 10.0,
) -> OneShotServer[T]:
    """Start a ``OneShotServer``; its ``port`` is bound when this returns."""
    return OneShotServer(handler, host, port, accept_timeout=accept_timeout)
