"""A local stand-in for api.stripe.com: records every request and answers
POST /v1/checkout/sessions the way Stripe does (a cs_ id and a checkout URL), honouring
Idempotency-Key as Stripe documents it: the first answer under a key, an error included,
is replayed to every request with that key, and one with other parameters is an
idempotency_error. The ledger points the stripe library at it (STRIPE_API_BASE)."""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    form: dict[str, str]


@dataclass
class StripeDouble:
    requests: list[Recorded] = field(default_factory=list)
    # (status, error type) answered to the next checkout requests instead of a session.
    failures: list[tuple[int, str]] = field(default_factory=list)
    # Seconds a checkout request waits before its answer (a Stripe that never answers).
    stall: float = 0.0
    # Idempotency-Key: (the request's form, the answer saved under the key).
    _saved: dict[str, tuple[dict[str, str], tuple[int, dict[str, Any]]]] = field(
        default_factory=dict
    )
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def checkout_requests(self) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.path == "/v1/checkout/sessions"]

    def start(self) -> StripeDouble:
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length).decode()
                form = dict(urllib.parse.parse_qsl(raw, keep_blank_values=True))
                recorded = Recorded("POST", self.path, dict(self.headers.items()), form)
                with double._lock:
                    double.requests.append(recorded)
                if double.stall and self.path == "/v1/checkout/sessions":
                    time.sleep(double.stall)
                status, body = double._answer(recorded)
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except ConnectionError:  # a client that stopped waiting (stall)
                    pass

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _answer(self, request: Recorded) -> tuple[int, dict[str, Any]]:
        with self._lock:
            if request.path != "/v1/checkout/sessions":
                return 404, {"error": {"type": "invalid_request_error", "message": "unknown"}}
            key = request.headers.get("Idempotency-Key", "")
            if key in self._saved:
                form, answer = self._saved[key]
                if form != request.form:
                    return 400, {
                        "error": {
                            "type": "idempotency_error",
                            "message": "Keys for idempotent requests can only be used with the"
                            " same parameters they were first used with.",
                        }
                    }
                return answer
            answer = self._new_answer(request)
            if key:
                self._saved[key] = (request.form, answer)
            return answer

    def _new_answer(self, request: Recorded) -> tuple[int, dict[str, Any]]:
        if self.failures:
            status, kind = self.failures.pop(0)
            return status, {"error": {"type": kind, "message": f"double says {kind}"}}
        session_id = f"cs_test_{uuid.uuid4().hex}"
        return 200, {
            "id": session_id,
            "object": "checkout.session",
            "mode": request.form.get("mode"),
            "client_reference_id": request.form.get("client_reference_id"),
            "url": f"https://checkout.stripe.test/c/pay/{session_id}",
            "status": "open",
            "payment_status": "unpaid",
        }
