"""A TCP proxy for fault injection between a client and a server on loopback.

Modes (``set_mode``), applied to open connections and to new ones at once:

- ``pass``: bytes flow both ways.
- ``blackhole``: sockets stay open, nothing is read or forwarded; bytes wait in the kernel
  buffers (a silent partition). Back in ``pass``, what waited is forwarded (the partition
  healed; TCP would have retransmitted) unless a peer gave up and closed meanwhile.
- ``reset``: every open connection is reset (RST, SO_LINGER 0) on both sides; a new
  connection is accepted and reset at once.

Threads: one accepting, two pumps per connection. Only loopback addresses.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading

MODES = ("pass", "blackhole", "reset")


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class _Pair:
    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client = client
        self.server = server
        self.closed = threading.Event()

    def reset(self) -> None:
        if not self.closed.is_set():
            self.closed.set()
            _reset(self.client)
            _reset(self.server)

    def close(self) -> None:
        if not self.closed.is_set():
            self.closed.set()
            for sock in (self.client, self.server):
                with contextlib.suppress(OSError):
                    sock.close()


class TcpProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        assert upstream_host in ("127.0.0.1", "localhost", "::1"), "loopback only"
        self.upstream = (upstream_host, upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.mode = "pass"
        self.accepted = 0
        self._pairs: set[_Pair] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        self._thread.start()

    def set_mode(self, mode: str) -> None:
        assert mode in MODES, mode
        self.mode = mode
        if mode == "reset":
            with self._lock:
                pairs, self._pairs = set(self._pairs), set()
            for pair in pairs:
                pair.reset()

    def open_connections(self) -> int:
        with self._lock:
            return sum(1 for p in self._pairs if not p.closed.is_set())

    def close(self) -> None:
        self._stopped.set()
        with contextlib.suppress(OSError):
            self.listener.close()
        with self._lock:
            pairs, self._pairs = set(self._pairs), set()
        for pair in pairs:
            pair.reset()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _addr = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            if self.mode == "reset":
                _reset(client)
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _reset(client)
                continue
            server.settimeout(None)
            pair = _Pair(client, server)
            with self._lock:
                self._pairs.add(pair)
            for src, dst in ((client, server), (server, client)):
                threading.Thread(
                    target=self._pump, args=(pair, src, dst), name="proxy-pump", daemon=True
                ).start()

    def _pump(self, pair: _Pair, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not pair.closed.is_set() and not self._stopped.is_set():
                if self.mode != "pass":  # blackhole: read nothing, forward nothing
                    pair.closed.wait(0.02)
                    continue
                readable, _, _ = select.select([src], [], [], 0.05)
                if not readable or self.mode != "pass":
                    continue
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except (OSError, ValueError):
            pass
        finally:
            with self._lock:
                self._pairs.discard(pair)
            pair.close()
