#!/usr/bin/env python3
"""A small OAuth2 authorization server: the demo IdP of `make run` and the
fault-injecting IdP of the end-to-end tests.

    python mock_idp.py --port 9000 [--client-id gateway --client-secret gateway-secret]

OAuth2 endpoints (form bodies, as the RFCs say):
  POST /oauth2/token       client_credentials-ish, no client auth (demo):
                           client_id, scope, sub, expires_in -> a random opaque token
  POST /oauth2/introspect  RFC 7662, HTTP Basic auth of the introspecting client
  POST /oauth2/revoke      RFC 7009, HTTP Basic auth

Control API for tests (JSON):
  POST /_control/tokens        {"token": "...", <claims>}: the claims object is
                               answered verbatim on introspection (never checked for exp)
  POST /_control/fault         {"mode": none|slow|status|nonjson|huge|reset,
                                "delay_ms": n, "status": code}
  GET  /_control/introspections {"count", "tokens", "last_headers", "last_body"}
  POST /_control/reset         forget the call records and the fault

Token values are never printed: the request log shows method, path and status only.
"""
import argparse
import base64
import json
import secrets
import socket
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from serving import serve
from urllib.parse import parse_qs, unquote_plus

HUGE_BODY_BYTES = 8 * 1024 * 1024
FAULT_MODES = {"none", "slow", "status", "nonjson", "huge", "reset"}
FORM = "application/x-www-form-urlencoded"


class IdpState:
    """Everything the server remembers, behind one lock (handlers run in threads)."""

    def __init__(self, client_id, client_secret):
        self.client_id = client_id
        self.client_secret = client_secret
        self.lock = threading.Lock()
        # token -> (claims dict, check_exp): issued tokens expire, control tokens are verbatim
        self.tokens = {}
        self.revoked = set()
        self.reset()

    def reset(self):
        with self.lock:
            self.calls = []  # one dict per introspection request received
            self.fault = {"mode": "none", "delay_ms": 0, "status": 500}

    def issue(self, client_id, scope, sub, expires_in):
        token = secrets.token_urlsafe(32)
        now = int(time.time())
        claims = {
            "active": True,
            "scope": scope,
            "client_id": client_id,
            "sub": sub or client_id,
            "exp": now + expires_in,
            "iat": now,
            "token_type": "Bearer",
        }
        with self.lock:
            self.tokens[token] = (claims, True)
        return token, claims

    def register(self, token, claims):
        with self.lock:
            self.tokens[token] = (claims, False)
            self.revoked.discard(token)

    def revoke(self, token):
        with self.lock:
            self.revoked.add(token)

    def answer_for(self, token):
        """The RFC 7662 answer for a token: its claims, or {"active": false}."""
        with self.lock:
            entry = self.tokens.get(token)
            revoked = token in self.revoked
        if entry is None or revoked:
            return {"active": False}
        claims, check_exp = entry
        if check_exp and claims["exp"] <= time.time():
            return {"active": False}
        return claims

    def record(self, token, body, headers):
        with self.lock:
            self.calls.append({"token": token, "body": body, "headers": headers})

    def records(self):
        with self.lock:
            calls = list(self.calls)
        last = calls[-1] if calls else {"headers": {}, "body": ""}
        return {
            "count": len(calls),
            "tokens": [c["token"] for c in calls],
            "last_headers": last["headers"],
            "last_body": last["body"],
        }


class Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 so Envoy can keep its connections to us alive (every answer has a length).
    protocol_version = "HTTP/1.1"
    server_version = "mock-idp/1"
    state: IdpState = None  # set by make_server
    verbose = False

    # ----- plumbing -----

    def log_message(self, fmt, *args):
        if self.verbose:
            # self.path never holds a token (tokens travel in bodies), so this is safe to print.
            sys.stderr.write("mock-idp: %s %s\n" % (self.command, fmt % args))

    def read_body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def send_json(self, status, obj, extra_headers=()):
        self.send_bytes(status, json.dumps(obj).encode(), "application/json", extra_headers)

    def send_bytes(self, status, body, content_type, extra_headers=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in extra_headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def form(self, body):
        return {k: v[0] for k, v in parse_qs(body.decode("latin-1"), keep_blank_values=True).items()}

    def is_form(self):
        return (self.headers.get("Content-Type") or "").split(";")[0].strip().lower() == FORM

    def basic_auth_ok(self):
        """client_secret_basic: id and secret are form-encoded, then base64 (RFC 6749 2.3.1)."""
        header = self.headers.get("Authorization") or ""
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            return False
        cid, sep, secret = decoded.partition(":")
        return bool(sep) and (unquote_plus(cid), unquote_plus(secret)) == (
            self.state.client_id,
            self.state.client_secret,
        )

    def reject_client(self):
        self.send_json(401, {"error": "invalid_client"}, [("WWW-Authenticate", 'Basic realm="mock-idp"')])

    # ----- routing -----

    def do_GET(self):
        if self.path == "/_control/introspections":
            return self.send_json(200, self.state.records())
        if self.path in ("/", "/healthz"):
            return self.send_json(200, {"ok": True})
        self.send_json(404, {"error": "not_found"})

    def do_POST(self):
        routes = {
            "/oauth2/token": self.token,
            "/oauth2/introspect": self.introspect,
            "/oauth2/revoke": self.revoke,
            "/_control/tokens": self.control_tokens,
            "/_control/fault": self.control_fault,
            "/_control/reset": self.control_reset,
        }
        route = routes.get(self.path.split("?")[0])
        if route is None:
            self.read_body()
            return self.send_json(404, {"error": "not_found"})
        route(self.read_body())

    # ----- OAuth2 -----

    def token(self, body):
        params = self.form(body)
        try:
            expires_in = int(params.get("expires_in") or 3600)
        except ValueError:
            return self.send_json(400, {"error": "invalid_request", "error_description": "expires_in"})
        client_id = params.get("client_id") or "demo"
        scope = params.get("scope", "")
        token, claims = self.state.issue(client_id, scope, params.get("sub"), expires_in)
        self.send_json(
            200,
            {"access_token": token, "token_type": "Bearer", "expires_in": expires_in, "scope": claims["scope"]},
        )

    def introspect(self, body):
        params = self.form(body)
        # Record first, so a call that meets a fault still counts as a call.
        self.state.record(
            params.get("token"),
            body.decode("utf-8", "replace"),
            {k.lower(): v for k, v in self.headers.items()},
        )
        if not self.basic_auth_ok():
            return self.reject_client()
        if not self.is_form() or "token" not in params:
            return self.send_json(400, {"error": "invalid_request"})
        answer = self.state.answer_for(params["token"])
        self.answer_with_fault(answer)

    def answer_with_fault(self, answer):
        with self.state.lock:
            fault = dict(self.state.fault)
        mode = fault["mode"]
        if mode == "slow":
            time.sleep(fault["delay_ms"] / 1000.0)
        elif mode == "status":
            return self.send_json(fault["status"], {"error": "server_error"})
        elif mode == "nonjson":
            return self.send_bytes(200, b"<html><body>Service Temporarily Unavailable</body></html>", "text/html")
        elif mode == "huge":
            # A valid, *active* answer padded to 8 MiB: a filter that accepted it would let the request in.
            padded = dict(answer, active=True, padding="")
            base = len(json.dumps(padded).encode())
            padded["padding"] = "x" * (HUGE_BODY_BYTES - base)
            return self.send_json(200, padded)
        elif mode == "reset":
            return self.reset_mid_answer()
        self.send_json(200, answer)

    def reset_mid_answer(self):
        # Promise a body, send half the headers, then close with RST (SO_LINGER 0).
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n")
        self.wfile.flush()
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def revoke(self, body):
        if not self.basic_auth_ok():
            return self.reject_client()
        params = self.form(body)
        if not self.is_form() or "token" not in params:
            return self.send_json(400, {"error": "invalid_request"})
        self.state.revoke(params["token"])
        # RFC 7009 2.2: 200 also for an unknown token.
        self.send_bytes(200, b"", "application/json")

    # ----- control API -----

    def control_tokens(self, body):
        try:
            claims = json.loads(body)
            token = claims.pop("token")
        except (ValueError, KeyError, AttributeError, TypeError):
            return self.send_json(400, {"error": "want a JSON object with a token member"})
        if not isinstance(token, str):
            return self.send_json(400, {"error": "token must be a string"})
        self.state.register(token, claims)
        self.send_json(200, {"ok": True})

    def control_fault(self, body):
        try:
            fault = json.loads(body)
            mode = fault.get("mode", "none")
            delay_ms = int(fault.get("delay_ms", 0))
            status = int(fault.get("status", 500))
        except (ValueError, AttributeError, TypeError):
            return self.send_json(400, {"error": "want {mode, delay_ms, status}"})
        if mode not in FAULT_MODES:
            return self.send_json(400, {"error": "mode must be one of " + ", ".join(sorted(FAULT_MODES))})
        with self.state.lock:
            self.state.fault = {"mode": mode, "delay_ms": delay_ms, "status": status}
        self.send_json(200, {"ok": True})

    def control_reset(self, body):
        self.state.reset()
        self.send_json(200, {"ok": True})


class Server(ThreadingHTTPServer):
    daemon_threads = True
    # Envoy opens one pool per worker; a burst must not overflow the accept backlog.
    request_queue_size = 256

    def handle_error(self, request, client_address):
        # A peer that hangs up (or our own "reset" fault) is not worth a traceback.
        if isinstance(sys.exc_info()[1], (ConnectionError, OSError)):
            return
        super().handle_error(request, client_address)


def make_server(port, client_id="gateway", client_secret="gateway-secret", verbose=False):
    handler = type("BoundHandler", (Handler,), {"state": IdpState(client_id, client_secret), "verbose": verbose})
    return Server(("127.0.0.1", port), handler)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--client-id", default="gateway")
    parser.add_argument("--client-secret", default="gateway-secret")
    parser.add_argument("--verbose", action="store_true", help="log each request (method, path, status)")
    args = parser.parse_args()
    return serve("mock-idp", args.port, lambda: make_server(args.port, args.client_id, args.client_secret, args.verbose))

if __name__ == "__main__":
    sys.exit(main())
