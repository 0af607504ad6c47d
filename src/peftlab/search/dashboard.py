"""Serve an Optuna study storage in optuna-dashboard, turning what users get wrong into one-line errors.

A search writes its trials to an Optuna storage (an SQLite file or a PostgreSQL database shared by several worker
processes); ``peftlab dashboard`` shows it live in the browser. optuna-dashboard is an optional dependency
(``pip install "peftlab[dashboard]"``), so it is imported only when the dashboard is started.
"""

from __future__ import annotations

import errno
import signal
import socket
import threading
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from peftlab import optional
from peftlab.errors import PeftlabError
from peftlab.search.storage import hide_password, open_existing, storage_url


def serve(storage: str, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve ``storage`` (SQLite file, ``sqlite:///`` or PostgreSQL URL) in optuna-dashboard until interrupted.

    Everything that can fail because of the user's input (dashboard not installed, missing database, unreachable
    server, busy port) is checked before the server starts and raised as a :class:`PeftlabError`; Ctrl-C returns
    normally, so the CLI exits without a traceback.
    """
    optuna_dashboard = optional.require("optuna_dashboard", "the dashboard")
    url = storage_url(storage)
    _check_port(host, port)
    app = optuna_dashboard.wsgi(open_existing(url))
    try:
        server = make_server(
            host, port, app, server_class=_V6Server if ":" in host else WSGIServer, handler_class=QuietHandler
        )
    except OSError as e:  # lost the race for the port between the check and the bind
        if e.errno == errno.EADDRINUSE:
            raise PeftlabError(_port_in_use(host, port)) from None
        raise
    print(
        f"optuna-dashboard for {hide_password(url)} on http://{_bracketed(host)}:{port}/ (Ctrl-C to stop)", flush=True
    )
    serve_until_interrupted(server)


def serve_until_interrupted(server: WSGIServer) -> None:
    """Serve until SIGINT, then finish the request in hand and stop.

    A KeyboardInterrupt raised inside a request would be caught by wsgiref's error handler, which prints it and
    serves on; so Ctrl-C asks the serving loop to stop (``shutdown`` must be called from another thread).
    """
    previous = signal.signal(signal.SIGINT, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    try:
        server.serve_forever()
    finally:
        signal.signal(signal.SIGINT, previous)
        server.server_close()


class _V6Server(WSGIServer):
    address_family = socket.AF_INET6


class QuietHandler(WSGIRequestHandler):
    """No access log: the dashboard polls every few seconds and would flood the terminal."""

    def log_message(self, format: str, *args: object) -> None:
        pass


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _check_port(host: str, port: int) -> None:
    """Bind (and release) the address the server will use, so a busy port is reported before anything starts.

    Binds the way wsgiref does (IPv6 only for a host with ``:``, SO_REUSEADDR set), so a port left in TIME_WAIT by a
    previous dashboard is not reported as busy.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise PeftlabError(f"port must be a whole number from 1 to 65535, got {port!r}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise PeftlabError(f"cannot listen on host {host!r}: {e.strerror}") from None
    fam, kind, proto, _, address = infos[0]
    with socket.socket(fam, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise PeftlabError(_port_in_use(host, port)) from None
            raise PeftlabError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def _port_in_use(host: str, port: int) -> str:
    return f"port {port} is already in use on {host}: stop what is using it or choose another port (--port)"
