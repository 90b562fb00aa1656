"""A TCP proxy in front of PostgreSQL that can take it away and bring it back on the same
port: `down()` closes the listening socket and cuts every connection (as a stopped server
does: connections lost, new ones refused), `up()` listens again. The PostgreSQL behind it
may listen on TCP or, as the embedded one does, only on a unix socket (its host a
directory)."""

from __future__ import annotations

import contextlib
import socket
import threading


class SwitchableProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._upstream_socket = (
            f"{upstream_host}/.s.PGSQL.{upstream_port}" if upstream_host.startswith("/") else None
        )
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])

    def up(self) -> SwitchableProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            cut, self._sockets = self._sockets, set()
        for sock in cut:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # down
            try:
                server = self._connect_upstream()
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._sockets |= {client, server}
            for source, target in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    def _connect_upstream(self) -> socket.socket:
        if self._upstream_socket is None:
            return socket.create_connection(self._upstream, timeout=5)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            server.settimeout(5)
            server.connect(self._upstream_socket)
        except OSError:
            server.close()
            raise
        return server

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)
