"""Membership and health of the resident ranks: each rank but 0 keeps one TCP connection to rank 0's control port.

A closed connection means that rank is gone (even after SIGKILL): rank 0 then fails the deployment and closes
the others' connections, and they exit. Rank 0 dying closes them all the same way.

Anybody who can reach the port can connect, so a connection counts only once it proves it belongs to this
deployment: rank 0 sends a fresh nonce, the rank answers with its hello and an HMAC-SHA256 over the nonce and
the hello under the deployment's secret (ENV_SECRET: handed to the ranks in their environment, written nowhere
else), and rank 0 answers with its own HMAC over both nonces, so a rank does not follow a stand-in either.
Everything read is bounded (HELLO_MAX bytes, HANDSHAKE_TIMEOUT seconds in total, MAX_PENDING handshakes at
once); a connection that fails any check is closed and logged, and the start goes on.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import socket
import sys
import threading
import time
from typing import Callable

from ..errors import ArthurError

ENV_SECRET = "ARTHUR_CONTROL_SECRET"
HELLO_MAX = 1024  # bytes of one handshake line
HANDSHAKE_TIMEOUT = 10.0  # seconds a connection has, in total, to prove itself
MAX_PENDING = 32  # handshakes in flight; more connections are closed at once
MAX_LOGGED = 20  # refused connections named in the rank's log (then only counted)
CONNECT_WAIT = 120.0  # seconds a rank keeps trying to reach rank 0's control port


class ControlError(ArthurError, RuntimeError):
    """A rank could not join rank 0's control port, or the port could not open."""


class Refused(ValueError):
    """One connection failed the handshake (the message says how); it is closed, nothing else changes."""


class Closed(Refused):
    """The other side closed the connection before a complete line."""


def _secret(secret: str | None) -> bytes:
    value = os.environ.get(ENV_SECRET, "") if secret is None else secret
    if len(value) < 32:
        raise ControlError(f"{ENV_SECRET} is not set (or shorter than 32 characters): the ranks must be started "
                           "by `arthur-cluster up`, which hands them the deployment's secret")
    return value.encode()


def _mac(secret: bytes, *parts: object) -> str:
    return hmac.new(secret, json.dumps(parts, separators=(",", ":")).encode(), hashlib.sha256).hexdigest()


def _read_line(conn: socket.socket, deadline: float) -> bytes:
    """One line of at most HELLO_MAX bytes before the deadline; Refused otherwise."""
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Refused(f"no complete line within {HANDSHAKE_TIMEOUT:g} s")
        conn.settimeout(left)
        try:
            chunk = conn.recv(HELLO_MAX + 1 - len(buf))
        except socket.timeout:
            raise Refused(f"no complete line within {HANDSHAKE_TIMEOUT:g} s") from None
        except ConnectionError:
            raise Closed("the connection was reset") from None
        if not chunk:
            raise Closed("closed before a complete line")
        buf += chunk
        if len(buf) > HELLO_MAX and b"\n" not in buf:
            raise Refused(f"a line over the {HELLO_MAX}-byte cap")
    line, _, rest = buf.partition(b"\n")
    if rest:
        raise Refused("sent more than one line")
    return line


def _object(line: bytes) -> dict:
    try:
        obj = json.loads(line)
    except ValueError:
        raise Refused("not JSON") from None
    if not isinstance(obj, dict):
        raise Refused(f"a JSON {type(obj).__name__}, not an object")
    return obj


def _field(obj: dict, key: str, kind: type, check: Callable[[object], bool]):
    value = obj.get(key)
    if type(value) is not kind or not check(value):
        raise Refused(f"field {key!r} missing or out of range")
    return value


def _hexfield(obj: dict, key: str, length: int) -> str:
    return _field(obj, key, str, lambda v: len(v) == length and all(c in "0123456789abcdef" for c in v))


class Control:
    """Rank 0's side: admits the other ranks once each has proved itself; a closed one means that rank is gone."""

    def __init__(self, host: str, port: int, expected: int, on_lost: Callable[[str], None],
                 secret: str | None = None):
        self.expected, self.on_lost = expected, on_lost
        self.secret = _secret(secret) if expected else b""
        self.peers: dict[int, tuple[socket.socket, dict]] = {}
        self.refused: list[str] = []  # the first MAX_LOGGED reasons, for the log and for tests
        self.refusals = 0
        self.stopping = False
        self.ready = threading.Event()
        self.lock = threading.Lock()
        self.pending = threading.BoundedSemaphore(MAX_PENDING)
        self.sock = socket.create_server((host, port))
        if expected == 0:
            self.ready.set()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopping:
            try:
                conn, addr = self.sock.accept()
            except OSError:
                return
            if self.ready.is_set():  # said, so that a late rank fails at once instead of knocking again
                self._refuse(conn, addr, "every rank is already in", tell=True)
                continue
            if not self.pending.acquire(blocking=False):
                self._refuse(conn, addr, f"over {MAX_PENDING} handshakes at once")
                continue
            threading.Thread(target=self._handshake, args=(conn, addr), daemon=True).start()

    def _handshake(self, conn: socket.socket, addr) -> None:
        try:
            hello = self._check(conn)
        except (Refused, OSError) as e:
            self._refuse(conn, addr, str(e))
            return
        finally:
            self.pending.release()
        threading.Thread(target=self._watch, args=(conn, hello), daemon=True).start()

    def _check(self, conn: socket.socket) -> dict:
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT
        nonce = secrets.token_hex(16)
        conn.settimeout(HANDSHAKE_TIMEOUT)
        conn.sendall((json.dumps({"nonce": nonce}) + "\n").encode())
        hello = _object(_read_line(conn, deadline))
        rank = _field(hello, "rank", int, lambda v: 1 <= v <= self.expected)
        pid = _field(hello, "pid", int, lambda v: 1 <= v < 2 ** 31)
        host = _field(hello, "host", str, lambda v: 0 < len(v) <= 255 and v.isprintable())
        theirs = _hexfield(hello, "nonce", 32)
        mac = _hexfield(hello, "mac", 64)
        if not hmac.compare_digest(mac, _mac(self.secret, "hello", nonce, theirs, rank, pid, host)):
            raise Refused(f"a hello for rank {rank} without this deployment's secret")
        with self.lock:
            if rank in self.peers or self.stopping:
                raise Refused(f"rank {rank} is already in")
            conn.sendall((json.dumps({"mac": _mac(self.secret, "welcome", nonce, theirs, rank)}) + "\n").encode())
            conn.settimeout(None)
            self.peers[rank] = (conn, {"rank": rank, "pid": pid, "host": host})
            if len(self.peers) == self.expected:
                self.ready.set()
        return self.peers[rank][1]

    def _refuse(self, conn: socket.socket, addr, why: str, tell: bool = False) -> None:
        try:
            if tell:
                conn.settimeout(1)
                conn.sendall((json.dumps({"refused": why}) + "\n").encode())
            conn.close()
        except OSError:
            pass
        with self.lock:
            self.refusals += 1
            if len(self.refused) < MAX_LOGGED:
                self.refused.append(f"{addr[0] if addr else '?'}: {why}")
                sys.stderr.write(f"control port: refused a connection from {addr[0] if addr else '?'}: {why}\n")

    def _watch(self, conn: socket.socket, hello: dict) -> None:
        try:
            while conn.recv(1024):
                pass
        except OSError:
            pass
        if not self.stopping:
            self.on_lost(f"rank {hello['rank']} (pid {hello['pid']} on {hello['host']}) is gone: "
                         "its connection to rank 0 closed")

    def close(self) -> None:
        with self.lock:
            self.stopping = True
            peers = list(self.peers.values())
        for conn, _ in peers:
            try:
                conn.close()
            except OSError:
                pass
        self.sock.close()


def _connect(address: str, rank: int) -> socket.socket:
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + CONNECT_WAIT
    while True:
        try:
            return socket.create_connection((host.strip("[]"), int(port)), timeout=5)
        except (OSError, ValueError):
            if time.monotonic() > deadline:
                raise ControlError(f"rank {rank} cannot reach rank 0's control port at {address}") from None
            time.sleep(0.2)


def _nonce(address: str, rank: int) -> tuple[socket.socket, str]:
    """A connection and rank 0's nonce. Closed before the nonce means rank 0 had too many handshakes at once
    (somebody else is knocking): try again, within CONNECT_WAIT."""
    end = time.monotonic() + CONNECT_WAIT
    while True:
        conn = _connect(address, rank)
        try:
            first = _object(_read_line(conn, time.monotonic() + HANDSHAKE_TIMEOUT))
            if isinstance(first.get("refused"), str):
                raise Refused(f"it refused this rank: {first['refused'][:200]}")
            return conn, _hexfield(first, "nonce", 32)
        except Refused as e:
            conn.close()
            if not isinstance(e, Closed) or time.monotonic() > end:
                raise ControlError(f"rank {rank}: rank 0's control port at {address} did not admit this rank "
                                   f"({e})") from None
            time.sleep(0.2)


def join(address: str, rank: int, secret: str | None = None) -> socket.socket:
    """Another rank's handshake with rank 0; the connection, once both sides have proved the secret."""
    key = _secret(secret)
    conn, nonce = _nonce(address, rank)
    try:
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT
        ours, pid, host = secrets.token_hex(16), os.getpid(), socket.gethostname()[:255] or "?"
        hello = {"rank": rank, "pid": pid, "host": host, "nonce": ours,
                 "mac": _mac(key, "hello", nonce, ours, rank, pid, host)}
        conn.sendall((json.dumps(hello) + "\n").encode())
        mac = _hexfield(_object(_read_line(conn, deadline)), "mac", 64)
        if not hmac.compare_digest(mac, _mac(key, "welcome", nonce, ours, rank)):
            raise Refused("its answer does not carry this deployment's secret")
    except (Refused, OSError) as e:
        conn.close()
        raise ControlError(f"rank {rank}: rank 0's control port at {address} did not admit this rank ({e}); "
                           "is another deployment on that port, or were the ranks started with different "
                           "secrets?") from None
    conn.settimeout(None)
    return conn


def follow_control(address: str, rank: int, stopping: threading.Event, secret: str | None = None) -> None:
    """Another rank's side: join rank 0 and exit the moment that connection closes."""
    conn = join(address, rank, secret)

    def watch() -> None:
        try:
            while conn.recv(1024):
                pass
        except OSError:
            pass
        if not stopping.is_set():
            os._exit(3)  # rank 0 is gone or gave up: nothing to follow any more

    threading.Thread(target=watch, daemon=True).start()


__all__ = ["Control", "ControlError", "follow_control", "join", "ENV_SECRET"]
