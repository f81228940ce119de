"""Running the application under uvicorn: in the foreground for ``--serve``, or on a background thread
(tests and the benchmark talk to a real server on 127.0.0.1 that way)."""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time
from typing import Any, Iterator

from ..config import ServeConfig
from ..errors import AltI2VError
from .limits import MAX_CONNECTIONS

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (``port`` 0 picks a free one); a clear error when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto given explicitly: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say they are TCP,
    # and without it every keep-alive response waits ~40 ms for a delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise AltI2VError(f"cannot listen on {host}:{port} ({e.strerror or e}); is another server running "
                          "there? choose another --port") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


HEADER_TIMEOUT = 10.0  # seconds a connection has to send a complete request head


def _protocol() -> type:
    """uvicorn's h11 protocol with a deadline for request heads. uvicorn waits for ever on a connection
    that sends nothing, or its headers a byte at a time, so such clients could hold every connection slot
    (and /api/health would answer 503); here the connection is closed after HEADER_TIMEOUT seconds without
    a complete head. Bodies have their own timeout (limits.timed_body)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11(H11Protocol):
        _head_timer: Any = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(HEADER_TIMEOUT, self._head_too_slow)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _waiting_for_head(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _head_too_slow(self) -> None:
            self._head_timer = None
            if self._waiting_for_head() and not self.transport.is_closing():
                self.transport.close()

        def handle_events(self) -> None:
            super().handle_events()
            if not self._waiting_for_head():
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11


def _server(app: Any, quiet: bool) -> Any:
    import uvicorn

    # the engine thread already serialises the model; 64 requests at once is plenty for one model, and the
    # connections beyond them are for the health check (limits.RequestGate answers busy requests 503)
    config = uvicorn.Config(app, log_level="warning" if quiet else "info", access_log=not quiet,
                            limit_concurrency=MAX_CONNECTIONS, timeout_keep_alive=5, server_header=False,
                            http=_protocol())
    return uvicorn.Server(config)


def run_server(model: Any, index: Any = None, config: ServeConfig | None = None, *, quiet: bool = False) -> None:
    """Serve the page and the API over ``model`` (and ``index``) until Ctrl-C."""
    from .app import create_app

    config = config or ServeConfig()
    sock = bind(config.host, config.port)
    try:
        app = create_app(model, index, config)
        if config.host not in LOOPBACK:
            print(f"alt-i2v: warning: listening on {config.host}: anyone who can reach this machine can use "
                  "the tagger (the default --host 127.0.0.1 keeps it local)", file=sys.stderr)
        if not quiet:
            print(f"alt-i2v: serving {app.state.service.tagger.model_dir} at {url_of(sock)} (Ctrl-C to stop)",
                  flush=True)
        try:
            _server(app, quiet).run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown: the normal way out
            pass
        if not quiet:
            print("alt-i2v: server stopped", flush=True)
    finally:
        sock.close()


@contextlib.contextmanager
def running(app: Any, host: str = "127.0.0.1", port: int = 0, *, timeout: float = 30.0) -> Iterator[str]:
    """A real uvicorn server on a background thread for the ``with`` block; yields its base URL."""
    sock = bind(host, port)
    server = _server(app, quiet=True)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="alt-i2v-serve", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise AltI2VError("the web server did not start")
            time.sleep(0.02)
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()


__all__ = ["run_server", "running", "bind"]
