"""The Stripe webhook receiver: `python -m workers.webhook` (started by `make run`).

POST /stripe/webhook: the signature is verified with the signing secret and a timestamp
tolerance (`stripe.Webhook.construct_event`); a bad one gets 400 and nothing is stored. A
verified event is stored under its Stripe event id (a duplicate delivery finds its row) and,
when new, enqueued as `workers.payments.process_event` with job_id = event id; then 200. If
Redis is down the event is stored all the same and answered 200: the sweeper re-queues it
from PostgreSQL. An event not stored is never answered 2xx, so Stripe delivers it again
later: PostgreSQL unreachable, or no pooled connection free within DELIVERY_CONNECTION_WAIT
seconds, answers 503 (within about a second while PostgreSQL is down: workers/pool.py),
and another database error 500. GET /healthz: 200 when the database answers.

Why the standard library's ThreadingHTTPServer and no web framework: the receiver has one
route that does two short blocking calls (one INSERT, one Redis push) with the synchronous
pool the jobs use; a thread per connection is all it needs (up to
LEDGER_WEBHOOK_MAX_CONNECTIONS, each dropped when its client stalls), and the process stays
a plain worker with no extra dependency. It sits behind the deployment's TLS-terminating
proxy.

Stopping (SIGTERM, SIGINT: a deploy, make run's Ctrl-C) drains: the listening socket is
closed at once (a new connection is refused, and Stripe retries), a connection waiting for
its next request is closed, and the deliveries in progress are stored and answered, for up
to LEDGER_SHUTDOWN_GRACE_SECONDS; only then does the process exit. A delivery still running
after the grace is cut off unanswered and Stripe delivers it again (had it been stored
meanwhile, the retry finds it, and the sweeper queues it). Before, the process exited at
once: a delivery being stored lost its connection with no answer.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import re
import select
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any, cast
from urllib.parse import urlsplit

import psycopg
import stripe
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb
from redis import Redis
from redis.exceptions import RedisError

from ledger_server.config import ConfigError, StripeSettings
from ledger_server.db.queries import query
from ledger_server.observability.logging import setup_logging
from workers import db
from workers.payments import account_hint, process_event
from workers.queues import PAYMENTS_QUEUE, enqueue, redis_connection
from workers.settings import WebhookLimits

log = logging.getLogger(__name__)

WEBHOOK_PATH = "/stripe/webhook"
MAX_BODY_BYTES = 1024 * 1024  # Stripe events are far smaller
# Stripe's event ids (evt_...); also what an RQ job id may hold. payment_events_event_id_format
_EVENT_ID = re.compile(r"[A-Za-z0-9_-]{1,255}")

Connect = Callable[[], AbstractContextManager[psycopg.Connection[TupleRow]]]

# The longest a delivery waits for a pooled connection while PostgreSQL answers (every
# connection lent). Stripe wants a quick answer and times a slow delivery out: the pool's
# own 30 s held the thread long after that, for an answer nobody read. Past it the delivery
# is answered 503, not stored, and Stripe delivers it again.
DELIVERY_CONNECTION_WAIT = 5.0


def _delivery_connection() -> AbstractContextManager[psycopg.Connection[TupleRow]]:
    return db.connection(DELIVERY_CONNECTION_WAIT)


# What PostgreSQL's jsonb cannot hold: NUL, and UTF-16 surrogates. json.loads pairs a
# high and a low surrogate escape into one character, so any surrogate left in a str is a
# lone one, which cannot be encoded as UTF-8 ("Unicode low surrogate must follow a high
# surrogate").
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _storable(value: Any) -> Any:
    if isinstance(value, str):
        return _UNSTORABLE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_storable(item) for item in value]
    if isinstance(value, dict):
        return {_storable(key): _storable(item) for key, item in value.items()}
    return value


def _refuse_future_timestamp(signature: str | None, tolerance: int) -> None:
    """The stripe library only refuses timestamps older than the tolerance; one further in
    the future than the tolerance is as suspect (a replay window held open), so it is too.
    The timestamp is read as the library reads it (the first `t=`, through int(), which
    takes "+123", " 123" and "1_23" too), so that it is the one the library accepted."""
    items = [part.split("=", 2) for part in (signature or "").split(",")]
    stamps = [item[1] for item in items if item[0] == "t" and len(item) > 1]
    if stamps and int(stamps[0]) > time.time() + tolerance:
        raise ValueError("Timestamp outside the tolerance zone (in the future)")


class WebhookReceiver:
    """What a POST does, apart from HTTP: verify, store, enqueue. Returns (status, body)."""

    def __init__(
        self,
        secret: str,
        tolerance_seconds: int,
        connect: Connect = _delivery_connection,
        redis: Callable[[], Redis] = redis_connection,
    ) -> None:
        self._secret = secret
        self._tolerance = tolerance_seconds
        self._connect = connect
        self._redis = redis

    def receive(self, body: bytes, signature: str | None) -> tuple[int, dict[str, Any]]:
        if not self._secret:
            return HTTPStatus.SERVICE_UNAVAILABLE, {"error": "STRIPE_WEBHOOK_SECRET is not set"}
        try:
            text = body.decode("utf-8")
            # The signature only: the payload is parsed below, so that a signed body which
            # is no event object is refused with 400 rather than failing inside the library.
            stripe.WebhookSignature.verify_header(
                text, signature or "", self._secret, self._tolerance
            )
            _refuse_future_timestamp(signature, self._tolerance)
            # PostgreSQL's jsonb cannot hold NUL characters or lone surrogates (a JSON
            # escape such as \ud83d with no pair), which a customer can type into a name or
            # address of a paid checkout: they are stored as U+FFFD rather than the event
            # refused with 500 for ever (and its credits lost). The signature was checked on
            # the raw bytes.
            payload = _storable(
                json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
            )
        except (stripe.SignatureVerificationError, ValueError, RecursionError) as exc:
            # ValueError: not UTF-8 or not JSON, or NaN/Infinity, spelled so or a number
            # past a float (1e999), which jsonb cannot hold: 500 for every delivery.
            # RecursionError: nested past what json or _storable follows. Nothing about the
            # request is stored.
            log.warning("webhook refused: %s", exc)
            return HTTPStatus.BAD_REQUEST, {"error": "invalid signature or payload"}
        # Signed but not an event object: refused for good with 400 (a 5xx would make Stripe
        # deliver it again forever).
        if not isinstance(payload, dict):
            return HTTPStatus.BAD_REQUEST, {"error": "the payload is not a storable event"}
        event_id, event_type = payload.get("id"), payload.get("type")
        if (
            not isinstance(event_id, str)
            or not _EVENT_ID.fullmatch(event_id)
            or not isinstance(event_type, str)
        ):
            return HTTPStatus.BAD_REQUEST, {"error": "the event has no id or type"}
        try:
            with self._connect() as conn:
                stored = conn.execute(
                    query("insert_payment_event"),
                    {
                        "event_id": event_id,
                        "type": event_type,
                        "account_id": account_hint(payload) or "",
                        "payload": Jsonb(payload),
                        "now": datetime.now(UTC),
                    },
                ).fetchone()
        except psycopg.OperationalError as exc:
            # PostgreSQL unreachable or the connection lost (the insert may have committed:
            # the retry then finds the row, and the sweeper queues it), or no connection
            # free in time: Stripe delivers the event again.
            log.warning("event %s not stored (database unavailable): %s", event_id, exc)
            return HTTPStatus.SERVICE_UNAVAILABLE, {"error": "database unavailable; retry"}
        if stored is None:
            return HTTPStatus.OK, {"received": True, "duplicate": True}
        try:
            enqueue(
                PAYMENTS_QUEUE, process_event, event_id, job_id=event_id, connection=self._redis()
            )
        except RedisError:
            log.warning("event %s stored, not queued (Redis down): the sweeper queues it", event_id)
        return HTTPStatus.OK, {"received": True, "duplicate": False}

    def healthy(self) -> bool:
        try:
            with self._connect() as conn:
                conn.execute(b"SELECT 1")
        except psycopg.Error:
            return False
        return True


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON that PostgreSQL stores")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is past what PostgreSQL stores as JSON")
    return value


class _Stopping:
    """Set once, when the receiver stops. A connection waiting for its next request waits on
    it beside its socket: a socket, readable from then on (never read), that poll() takes."""

    def __init__(self) -> None:
        self._watched, self._setter = socket.socketpair()
        self.is_set = False

    def set(self) -> None:
        if not self.is_set:
            self.is_set = True
            self._setter.send(b"\0")

    def fileno(self) -> int:
        return self._watched.fileno()

    def close(self) -> None:
        self._watched.close()
        self._setter.close()


def _handler(
    receiver: WebhookReceiver, limits: WebhookLimits, stopping: _Stopping
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "credit-ledger-webhook"
        # The socket time-out of every read and write: a client that stalls (or an idle
        # keep-alive connection) is dropped after it rather than holding its thread for good.
        timeout = limits.timeout_seconds
        _body_read = False  # of the request being answered

        _head = False  # a HEAD request: the answer's headers only

        def _answer(self, status: int, body: dict[str, Any], allow: str = "") -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            if allow:
                self.send_header("Allow", allow)
            if stopping.is_set or (
                not self._body_read
                and (
                    "Transfer-Encoding" in self.headers
                    # Every length: a first "0" beside another kept the connection, and the
                    # other's body was served as a request of its own (helper-166).
                    or any(v.strip() != "0" for v in self.headers.get_all("Content-Length") or [])
                )
            ):
                # Stopping: this answer is the connection's last. A body left unread would
                # be taken for the next request on the connection.
                self.send_header("Connection", "close")  # sets close_connection
            self._body_read = False
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if not self._head:
                self.wfile.write(data)
            self._head = False

        def _route(self) -> str:
            """The request's path without its query string, nor a trailing slash: the
            endpoint registered at Stripe as .../stripe/webhook?env=prod got 404 for every
            event, which Stripe retries for three days and then disables (helper-165)."""
            path = urlsplit(self.path).path
            return path[:-1] if len(path) > 1 and path.endswith("/") else path

        def _not_allowed(self) -> None:
            route = self._route()
            allowed = {WEBHOOK_PATH: "POST", "/healthz": "GET, HEAD"}.get(route)
            if allowed is None:
                self._answer(HTTPStatus.NOT_FOUND, {"error": "not found"})
            else:
                self._answer(
                    HTTPStatus.METHOD_NOT_ALLOWED, {"error": "method not allowed"}, allowed
                )

        do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

        def do_HEAD(self) -> None:  # load balancers' health checks; no body
            self._head = True
            self.do_GET()

        def do_GET(self) -> None:
            if self._route() != "/healthz":
                self._not_allowed()
            elif receiver.healthy():
                self._answer(HTTPStatus.OK, {"status": "ok"})
            else:
                self._answer(HTTPStatus.SERVICE_UNAVAILABLE, {"status": "database unavailable"})

        def do_POST(self) -> None:
            if self._route() != WEBHOOK_PATH:
                self._not_allowed()
                return
            if "Transfer-Encoding" in self.headers:
                # Not read here (Stripe sends Content-Length). With Content-Length beside it,
                # a proxy in front may have framed the body by the one and this receiver by
                # the other (request smuggling): refused either way, the connection closed.
                self._answer(HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length required"})
                return
            lengths = set(self.headers.get_all("Content-Length") or [])
            if not lengths:
                self._answer(HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length required"})
                return
            # One length, of digits only: two that differ (or "1_0", "+10", which int()
            # reads) let a proxy in front frame the body by one and this receiver by another,
            # the rest served as a request of its own (helper-165). The connection is closed.
            (given,) = lengths if len(lengths) == 1 else ("",)
            if not (given.isascii() and given.isdigit()):
                self._answer(HTTPStatus.BAD_REQUEST, {"error": "one Content-Length of digits"})
                return
            length = int(given)
            if length > MAX_BODY_BYTES:
                self._answer(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "body too large"})
                return
            body = self._read_body(length)
            if body is None:
                return
            self._body_read = True
            try:
                status, answer = receiver.receive(body, self.headers.get("Stripe-Signature"))
            except Exception:
                log.exception("webhook not stored")
                status, answer = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "not stored; retry"}
            self._answer(status, answer)

        def handle_one_request(self) -> None:
            # The request line and headers within one time-out in all, as the body: the
            # socket's time-out bounds each read only, and a client sending a header byte
            # now and then held its connection, and with the cap every delivery got 503
            # (helper-92). Past it the connection is shut, which ends the blocked read.
            self._headers_deadline = threading.Timer(limits.timeout_seconds, self._cut_off)
            self._headers_deadline.daemon = True
            self._headers_deadline.start()
            try:
                if self._request_arrives():
                    super().handle_one_request()
                else:
                    self.close_connection = True
            finally:
                self._headers_deadline.cancel()

        def _request_arrives(self) -> bool:
            """Waits for the first byte of the next request (or the client's close, which
            reading the request finds); False when none came within the time-out, or none
            had come when the receiver began to stop: an idle keep-alive connection is then
            closed rather than holding the stop up until its time-out. A client that sends
            a request on it at that very moment sees the connection closed unanswered, as
            at any keep-alive time-out (Stripe delivers it again)."""
            if self._pending():
                return True
            poller = select.poll()
            poller.register(self.connection, select.POLLIN)
            poller.register(stopping, select.POLLIN)
            ready = {fd for fd, _ in poller.poll(limits.timeout_seconds * 1000)}
            if self.connection.fileno() in ready:
                return True
            return self._pending()  # the time-out or the stop; a request just sent is served

        def _pending(self) -> bool:
            """Whether a request has begun, without waiting: bytes on the socket, or in the
            read buffer (a request sent behind the last one, which the socket no longer
            shows). A client's close reads as nothing pending; a reset raises, as a read
            of the request would (handle_error logs it)."""
            rfile = cast(io.BufferedReader, self.rfile)  # the socket's makefile("rb", -1)
            self.connection.setblocking(False)
            try:
                return bool(rfile.peek(1))  # b"" when the socket would block
            finally:
                self.connection.settimeout(limits.timeout_seconds)

        def parse_request(self) -> bool:
            parsed = super().parse_request()
            self._headers_deadline.cancel()  # the headers are in: the body has its own
            return parsed

        def _cut_off(self) -> None:
            with contextlib.suppress(OSError):  # closed already
                self.connection.shutdown(socket.SHUT_RDWR)

        def _read_body(self, length: int) -> bytes | None:
            """The body, read within one time-out in all (a client sending a byte now and
            then gets no longer); None if the client closed the connection before the end."""
            deadline = time.monotonic() + limits.timeout_seconds
            chunks: list[bytes] = []
            while length > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the body took longer than the time-out")
                self.connection.settimeout(left)
                chunk = self.rfile.read1(length)
                if not chunk:
                    self.close_connection = True
                    return None
                chunks.append(chunk)
                length -= len(chunk)
            self.connection.settimeout(limits.timeout_seconds)
            return b"".join(chunks)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.address_string(), *args)

    return Handler


_BUSY_BODY = json.dumps({"error": "busy; retry shortly"}).encode()
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\nRetry-After: 1\r\nConnection: close\r\n\r\n%s"
) % (len(_BUSY_BODY), _BUSY_BODY)


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default listen backlog is 5: a burst of Stripe deliveries (retries after
    # an outage arrive together) would see connections reset.
    request_queue_size = 256

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        max_connections: int,
        stopping: _Stopping,
    ) -> None:
        # A thread per connection, as many as clients connect, would let stalled clients
        # take the process's memory and file descriptors until deliveries are not served.
        self._slots = threading.BoundedSemaphore(max_connections)
        # The connections being served, which stopping waits for (their threads are daemons:
        # the process's exit would cut them off mid-delivery).
        self._served: set[socket.socket] = set()
        self._served_changed = threading.Condition()
        self._stopping = stopping
        # Refused connections, answered and closed for writing, with when to close them.
        self._refused: deque[tuple[float, socket.socket]] = deque()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        with self._served_changed:
            self._served.add(request)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._served_ended(request)  # no thread started
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)  # answered and closed
        finally:
            self._served_ended(request)

    def _served_ended(self, request: socket.socket) -> None:
        self._slots.release()
        with self._served_changed:
            self._served.discard(request)
            self._served_changed.notify_all()

    def drain(self, grace_seconds: float) -> tuple[int, int]:
        """After serve_forever has ended and the listening socket is closed: closes the
        connections waiting for a request, lets the others finish the request they are in
        (each closed after its answer) for up to grace_seconds, then cuts off those still
        running. Returns how many connections there were and how many were cut off."""
        self._stopping.set()
        deadline = time.monotonic() + grace_seconds
        with self._served_changed:
            open_at_stop = len(self._served)
            while self._served and (left := deadline - time.monotonic()) > 0:
                self._served_changed.wait(left)
            running = list(self._served)
        for request in running:
            with contextlib.suppress(OSError):  # closed meanwhile
                request.shutdown(socket.SHUT_RDWR)
        return open_at_stop, len(running)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver's own prints a traceback on stderr, which is no log line (JSON lines
        # with LEDGER_LOG_FORMAT=json): one line through the log instead.
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # the client reset the connection or went away
            log.info("webhook connection from %s ended: %r", client_address[0], exc)
        else:
            log.exception("webhook connection from %s failed", client_address[0])

    def _refuse(self, request: socket.socket) -> None:
        """503 at once, on the accepting thread and without a thread of its own: the client
        (Stripe) retries. The socket stays open for reading a moment: closed now, the request
        the client is still sending would reset the connection before it reads the 503."""
        try:
            request.settimeout(1)
            request.sendall(_BUSY)
            request.shutdown(socket.SHUT_WR)
        except OSError:
            request.close()
            return
        self._refused.append((time.monotonic() + _REFUSED_LINGER_SECONDS, request))
        while len(self._refused) > _REFUSED_LINGER_MAX:  # a flood: no more descriptors held
            _close_refused(self._refused.popleft()[1])

    def service_actions(self) -> None:
        """Run by serve_forever at least every half second."""
        super().service_actions()
        now = time.monotonic()
        while self._refused and self._refused[0][0] <= now:
            _close_refused(self._refused.popleft()[1])

    def server_close(self) -> None:
        super().server_close()
        while self._refused:
            _close_refused(self._refused.popleft()[1])


_REFUSED_LINGER_SECONDS = 1.0
_REFUSED_LINGER_MAX = 64


def _close_refused(request: socket.socket) -> None:
    # What the client sent is read first: closing a socket with unread data resets the
    # connection, and the client could lose the 503 it has not read yet.
    try:
        request.setblocking(False)
        for _ in range(16):  # a request is far smaller; a client still sending is cut off
            if not request.recv(65536):
                break
    except OSError:
        pass
    request.close()


class WebhookServer:
    """The HTTP server around a receiver, serving on a background thread."""

    def __init__(
        self, receiver: WebhookReceiver, address: str, limits: WebhookLimits | None = None
    ) -> None:
        limits = limits or WebhookLimits()
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"LEDGER_WEBHOOK_ADDR must be host:port, got {address!r}")
        self._limits = limits
        self._stopping = _Stopping()
        try:
            self._http = _HttpServer(
                (host, int(port)),
                _handler(receiver, limits, self._stopping),
                limits.max_connections,
                self._stopping,
            )
        except BaseException:
            self._stopping.close()
            raise
        self._thread = threading.Thread(
            target=self._http.serve_forever, name="webhook-http", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._http.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> WebhookServer:
        self._thread.start()
        return self

    def stop(self, grace_seconds: float | None = None) -> None:
        """Stops accepting at once, then waits for the requests in progress to be answered,
        for up to grace_seconds (by default the limits' shutdown grace)."""
        grace = self._limits.shutdown_grace_seconds if grace_seconds is None else grace_seconds
        self._http.shutdown()  # serve_forever's loop ends: nothing more is accepted
        # Closed now, not after the drain: a connection made meanwhile would wait in the
        # backlog, never served, until the close reset it.
        self._http.socket.close()
        served, cut = self._http.drain(grace)
        if cut:
            log.warning(
                "webhook receiver stopped with %d deliveries unanswered after the %g s grace"
                " (Stripe retries them)",
                cut,
                grace,
            )
        elif served:
            log.info("webhook receiver stopped: %d open connections answered or closed", served)
        self._http.server_close()
        self._thread.join()
        if not cut:  # a connection cut off may still be polling it
            self._stopping.close()


def main() -> int:
    try:
        setup_logging()  # JSON lines on stderr (LEDGER_LOG_FORMAT, LEDGER_LOG_LEVEL)
        settings = StripeSettings.from_env()
        db.database_url()
        redis_connection()
        tolerance = int(settings.webhook_tolerance.total_seconds())
        limits = WebhookLimits.from_env()
        server = WebhookServer(
            WebhookReceiver(settings.webhook_secret, tolerance), settings.webhook_addr, limits
        )
    except (ConfigError, ValueError) as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    if not settings.webhook_secret:
        log.warning("STRIPE_WEBHOOK_SECRET is not set: webhooks are answered 503 until it is")
    stop = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    server.start()
    with db.connection() as conn:  # an unreachable database fails the start
        conn.execute(b"SELECT 1")
    log.info("Stripe webhooks: POST %s%s", server.url, WEBHOOK_PATH)
    # Waited on with a time-out: Python runs signal handlers on the main thread only, and
    # one blocked in an untimed Event.wait() was found still in it 10 s after SIGTERM (3
    # runs in 6 of tests/test_webhook_shutdown.py, under load): the receiver ignored the
    # SIGTERM until make run's or the deploy's SIGKILL. Woken every 0.2 s, it runs them.
    while not stop.wait(0.2):
        pass
    log.info(
        "stopping the webhook receiver: deliveries in progress get up to %g s",
        limits.shutdown_grace_seconds,
    )
    server.stop()
    db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
