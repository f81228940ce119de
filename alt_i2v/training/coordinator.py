"""Before JAX starts a distributed run: the ``--coordinator`` address checked, and a roll call of every
process on it.

JAX's coordination service aborts the whole process (a C++ stack trace, after a minute or more) when its
port is taken, out of range or not a number, or when two processes claim one ``--process-id``. So the
address is parsed here first (a usage error in one line), process 0 binds it itself (port in use, or not
an address of this machine: one line), and every other process checks in with process 0 over that same
port before ``jax.distributed.initialize``: process 0 answers once each id 1..N-1 has checked in exactly
once, and a duplicate id (or a different ``--num-processes``) stops every process at once with a message
that names it. Then process 0 closes the socket and JAX's coordinator takes the port, bound to the host
given (never to all interfaces).
"""

from __future__ import annotations

import errno
import json
import selectors
import socket
import time
from typing import Any

from ..errors import AltI2VError, UsageError

HELLO = "alt-i2v roll call"
MAX_LINE = 4096


def parse_address(address: str) -> tuple[str, int]:
    """``(host, port)`` of ``HOST:PORT`` (``[v6]:PORT`` too); a UsageError saying what is wrong."""
    host, sep, port = (address or "").strip().rpartition(":")
    if not sep or not host:
        raise UsageError(f"--coordinator {address!r}: give HOST:PORT (the address of process 0), "
                         "e.g. 10.0.0.1:12345")
    if not port.isdigit():
        raise UsageError(f"--coordinator {address!r}: the port {port!r} is not a number")
    if not 1 <= int(port) <= 65535:
        raise UsageError(f"--coordinator {address!r}: port {int(port)} is outside 1..65535")
    return host.strip("[]"), int(port)


def bind_address(address: str) -> str:
    """The address JAX's coordinator binds: the host given, bracketed when it is an IPv6 literal."""
    host, port = parse_address(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def claim(address: str) -> socket.socket:
    """Process 0: a listening socket on ``address`` (the host given, never all interfaces), or one line
    saying why not. Bound without SO_REUSEPORT, so a port any other program (or another run's process 0)
    listens on is refused here rather than shared."""
    host, port = parse_address(address)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise AltI2VError(f"--coordinator {address}: cannot resolve {host!r} ({e.strerror})") from None
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT of an earlier run is no conflict
        sock.bind(sockaddr)
        sock.listen(64)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise AltI2VError(f"--coordinator {address}: port {port} is in use (another program, or the process 0 "
                              "of another run, listens there; is --process-id 0 given twice?); choose another "
                              "port") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise AltI2VError(f"--coordinator {address}: {host} is not an address of this machine; process 0 "
                              "runs on the host --coordinator names") from None
        if e.errno == errno.EACCES:
            raise AltI2VError(f"--coordinator {address}: not allowed to listen on port {port} (ports below "
                              "1024 need privileges); choose another port") from None
        raise AltI2VError(f"--coordinator {address}: cannot listen there ({e.strerror or e})") from None
    return sock


def _send(conn: socket.socket, doc: dict[str, Any]) -> None:
    try:
        conn.sendall(json.dumps(doc).encode() + b"\n")
    except OSError:
        pass


def roll_call(sock: socket.socket, num_processes: int, timeout: float) -> None:
    """Process 0: wait until processes 1..N-1 have each checked in once, then answer them all and close
    ``sock``. A duplicate id or a different process count stops the run (every process is told)."""
    sel = selectors.DefaultSelector()
    sock.setblocking(False)
    sel.register(sock, selectors.EVENT_READ)
    pending: dict[socket.socket, bytes] = {}
    joined: dict[int, tuple[socket.socket, str]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(joined) < num_processes - 1:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = [str(i) for i in range(1, num_processes) if i not in joined]
                raise AltI2VError(f"process 0: process(es) {', '.join(missing)} of {num_processes} did not join at "
                                  f"{_name(sock)} within {timeout:.0f} s; start them with the same --coordinator "
                                  "and --num-processes")
            for key, _ in sel.select(min(left, 1.0)):
                if key.fileobj is sock:
                    try:
                        conn, _ = sock.accept()
                    except OSError:
                        continue
                    conn.setblocking(False)
                    pending[conn] = b""
                    sel.register(conn, selectors.EVENT_READ)
                    continue
                conn = key.fileobj
                try:
                    data = conn.recv(MAX_LINE)
                except OSError:
                    data = b""
                buf = pending.get(conn, b"") + data
                if not data or len(buf) > MAX_LINE:
                    sel.unregister(conn)
                    pending.pop(conn, None)
                    conn.close()
                    continue
                if b"\n" not in buf:
                    pending[conn] = buf
                    continue
                sel.unregister(conn)
                pending.pop(conn, None)
                hello = _hello(buf.split(b"\n", 1)[0])
                if hello is None:
                    conn.close()  # not one of ours (a port scanner, a stray client): ignored
                    continue
                pid, count, host = hello
                problem = None
                if count != num_processes:
                    problem = (f"process {pid} (on {host}) was given --num-processes {count}, process 0 "
                               f"{num_processes}; give every process the same")
                elif not 1 <= pid < num_processes:
                    problem = f"--process-id {pid} (on {host}) is not in 1..{num_processes - 1}"
                elif pid in joined:
                    problem = (f"--process-id {pid} was given to two processes (on {joined[pid][1]} and on {host}); "
                               "give each process its own id")
                if problem:
                    for other in [conn] + [c for c, _ in joined.values()]:
                        _send(other, {"error": problem})
                        other.close()
                    joined.clear()
                    raise AltI2VError(f"process 0: {problem}")
                joined[pid] = (conn, host)
        for conn, _ in joined.values():
            conn.setblocking(True)
            _send(conn, {"ok": True})
    finally:
        for conn, _ in joined.values():
            conn.close()
        for conn in pending:
            conn.close()
        sel.close()
        sock.close()


def _hello(line: bytes) -> tuple[int, int, str] | None:
    try:
        doc = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(doc, dict) or doc.get("hello") != HELLO:
        return None
    pid, count, host = doc.get("process_id"), doc.get("num_processes"), doc.get("host")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (pid, count)):
        return None
    return pid, count, str(host)[:200]


def _name(sock: socket.socket) -> str:
    try:
        host, port = sock.getsockname()[:2]
    except OSError:
        return "the coordinator"
    return f"{host}:{port}"


def check_in(address: str, process_id: int, num_processes: int, timeout: float) -> None:
    """Process ``process_id`` > 0: check in with process 0 at ``address`` and wait for its word that every
    process is there (each id once). One line when nothing answers in ``timeout`` seconds, or when process 0
    reports a duplicate id or a different process count."""
    host, port = parse_address(address)
    hello = json.dumps({"hello": HELLO, "process_id": process_id, "num_processes": num_processes,
                        "host": socket.gethostname()}).encode() + b"\n"
    deadline = time.monotonic() + timeout
    last = "nothing listens there"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AltI2VError(f"process {process_id}: no process 0 answered at --coordinator {address} within "
                              f"{timeout:.0f} s ({last}); start process 0 there, with the same --coordinator "
                              "(HOST:PORT of process 0, reachable from every host) and --num-processes")
        try:
            with socket.create_connection((host, port), timeout=min(left, 5)) as conn:
                conn.sendall(hello)
                conn.settimeout(max(left, 0.1))
                reply = b""
                while b"\n" not in reply and len(reply) <= MAX_LINE:
                    chunk = conn.recv(MAX_LINE)
                    if not chunk:
                        break
                    reply += chunk
        except (OSError, socket.timeout) as e:
            last = str(e) or type(e).__name__
            time.sleep(0.5)
            continue
        try:
            doc = json.loads(reply.split(b"\n", 1)[0])
        except (ValueError, UnicodeDecodeError, RecursionError):
            doc = None
        if isinstance(doc, dict) and doc.get("ok") is True:
            return
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            raise AltI2VError(f"process {process_id}: {doc['error']}")
        last = "something answered there that is not an alt-i2v process 0 taking the roll call " \
               "(the run may have started without this process: is this --process-id given twice?)"
        time.sleep(0.5)


__all__ = ["parse_address", "bind_address", "claim", "roll_call", "check_in"]
