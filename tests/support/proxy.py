"""A TCP proxy between a gRPC client and server that can lose a response on purpose.

It forwards bytes both ways, and reads the server-to-client direction as HTTP/2 frames
(9-byte header: length, type, flags, stream id). The first HEADERS frame on a non-zero
stream is the start of a response: for a unary call the server sends it only once the
handler has returned, so by then the server has done the work (its transaction is
committed). When armed, the proxy cuts the connection there, so the client never sees the
answer:

- ``drop_next_response()``: the client's connection is closed at once (the client sees
  UNAVAILABLE);
- ``hold_next_response()``: nothing more reaches the client, the connection stays open
  until ``drop_held()``, so a test can act (check the database, restart the server) while
  the client waits, then let it see the failure.

Connections opened after that are forwarded normally. Runs its own event loop in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass

_FRAME_HEADER = 9
_HEADERS = 0x1


@dataclass
class _Connection:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    held: bool = False

    def abort(self) -> None:
        self.client.transport.abort()
        if self.upstream is not None:
            self.upstream.transport.abort()


class DropProxy:
    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream_host, self.upstream_port = host, int(port)
        self.port = 0
        self.connections = 0
        self.responses_dropped = 0
        self._lock = threading.Lock()
        self._armed: str | None = None  # "drop" | "hold"
        self._held_event = threading.Event()
        self._held: list[_Connection] = []
        self._open: dict[asyncio.Task[None], _Connection] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="drop-proxy", daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # --- control, from the test's thread ---------------------------------------------------

    def start(self) -> DropProxy:
        self._thread.start()
        if not self._ready.wait(timeout=10):
            raise RuntimeError("the proxy did not start")
        return self

    def close(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> DropProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def drop_next_response(self) -> None:
        with self._lock:
            self._armed = "drop"

    def hold_next_response(self) -> None:
        with self._lock:
            self._armed = "hold"
            self._held_event.clear()

    def wait_until_held(self, timeout: float = 30) -> None:
        if not self._held_event.wait(timeout):
            raise AssertionError(f"no response reached the proxy within {timeout} s")

    def drop_held(self) -> None:
        """Closes the connections whose response is held: the client now sees it fail."""
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(self._drop_held(), self._loop).result(timeout=10)

    # --- the event loop --------------------------------------------------------------------

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._listen())
            self._ready.set()
            loop.run_forever()
        finally:
            loop.close()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in self._open.values():
            conn.abort()
        if self._open:
            await asyncio.wait(list(self._open), timeout=5)

    async def _drop_held(self) -> None:
        held, self._held = self._held, []
        for conn in held:
            conn.abort()
            self.responses_dropped += 1

    def _take_arm(self) -> str | None:
        with self._lock:
            armed, self._armed = self._armed, None
            return armed

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = _Connection(client=writer)
        task = asyncio.current_task()
        assert task is not None
        self._open[task] = conn
        try:
            try:
                up_reader, conn.upstream = await asyncio.open_connection(
                    self.upstream_host, self.upstream_port
                )
            except OSError:
                writer.transport.abort()  # the server is down: the client sees UNAVAILABLE
                return
            await asyncio.gather(
                self._client_to_server(reader, conn),
                self._server_to_client(up_reader, conn),
                return_exceptions=True,
            )
        finally:
            del self._open[task]

    async def _client_to_server(self, reader: asyncio.StreamReader, conn: _Connection) -> None:
        assert conn.upstream is not None
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if conn.held:
                    continue  # the server may be gone; the client waits for drop_held()
                conn.upstream.write(data)
                await conn.upstream.drain()
        if not conn.held:
            conn.abort()

    async def _server_to_client(self, reader: asyncio.StreamReader, conn: _Connection) -> None:
        buffer = b""
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if conn.held:
                    continue
                buffer += data
                forward = bytearray()
                while len(buffer) >= _FRAME_HEADER:
                    length = int.from_bytes(buffer[0:3], "big")
                    if len(buffer) < _FRAME_HEADER + length:
                        break
                    frame_type = buffer[3]
                    stream_id = int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
                    if frame_type == _HEADERS and stream_id != 0:
                        armed = self._take_arm()
                        if armed is not None:
                            await self._cut(conn, forward, armed)
                            return
                    forward += buffer[: _FRAME_HEADER + length]
                    buffer = buffer[_FRAME_HEADER + length :]
                if forward:
                    conn.client.write(bytes(forward))
                    await conn.client.drain()
        if not conn.held:
            conn.abort()

    async def _cut(self, conn: _Connection, forward: bytearray, mode: str) -> None:
        """The response starts here: pass on what came before it, then lose the rest."""
        if forward:
            conn.client.write(bytes(forward))
            with contextlib.suppress(OSError):
                await conn.client.drain()
        if mode == "drop":
            conn.abort()
            self.responses_dropped += 1
            return
        conn.held = True
        self._held.append(conn)
        self._held_event.set()
