"""Listening sockets for the servers (``vqad serve``, ``vqad view``): one place that turns a bad ``--host``
or ``--port`` into an error that says what to do."""

from __future__ import annotations

import errno
import socket

from vqad.errors import InputError


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine (so nobody else can connect)."""
    if host.lower() == "localhost":
        return True
    try:
        import ipaddress

        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port(port: int) -> None:
    """Refuse a TCP port outside 0..65535 (0: a free one), before any other work."""
    if not 0 <= port <= 65535:
        raise InputError(f"--port must be in 0..65535 (0 picks a free port), got {port}")


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port`` 0: a free one), or an InputError that says what to do."""
    check_port(port)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InputError(f"cannot use --host {host!r}: {exc.strerror}; give an address such as 127.0.0.1 or 0.0.0.0") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        hint = ("choose another with --port, or --port 0 for a free one" if exc.errno == errno.EADDRINUSE else
                "ports below 1024 need privileges: choose another with --port" if exc.errno == errno.EACCES else
                "check --host names an address of this machine")
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror}; {hint}") from None
    sock.setblocking(False)
    return sock


__all__ = ["bind_socket", "is_loopback"]
