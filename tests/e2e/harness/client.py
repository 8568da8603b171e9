"""HTTP from the test's side: one request, a burst, forms and JSON."""
import base64
import http.client
import itertools
import json
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass

from .paths import LOOPBACK


@dataclass
class Response:
    status: int
    headers: list  # [(name, value)] in order; names as sent
    body: bytes
    elapsed: float = 0.0

    def header(self, name):
        """The value of a header (the first, if repeated), or None."""
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name):
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        # Short, and with bearer tokens masked: the echo upstream repeats the Authorization header.
        masked = re.sub(rb"(?i)(bearer +)[A-Za-z0-9._~+/=-]{12,}", rb"\1<token>", self.body[:300])
        return f"<Response {self.status} {masked!r}>"


def request(port, path="/", headers=None, method="GET", body=None, timeout=10.0):
    """One request on a new connection; returns a Response with all header values."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        started = time.monotonic()
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in _header_items(headers):
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        return Response(resp.status, resp.getheaders(), data, time.monotonic() - started)
    finally:
        conn.close()


def get(port, path="/", headers=None, timeout=10.0):
    return request(port, path, headers, "GET", None, timeout)


def _header_items(headers):
    if headers is None:
        return []
    if isinstance(headers, dict):
        return list(headers.items())
    return list(headers)  # a list of pairs allows repeated names


def bearer(token, scheme="Bearer"):
    return {"Authorization": f"{scheme} {token}"}


def burst(port, n=400, connections=32, headers=None, path="/", timeout=15.0):
    """n requests over `connections` keep-alive connections, all threads released at once.

    Returns the statuses (0 for a transport error) in completion order.
    """
    counter = itertools.count()
    statuses = []
    lock = threading.Lock()
    start = threading.Barrier(connections)
    items = _header_items(headers)

    def worker():
        conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
        start.wait()
        while next(counter) < n:
            try:
                conn.request("GET", path, headers=dict(items))
                resp = conn.getresponse()
                resp.read()
                status = resp.status
                if resp.will_close:
                    conn.close()
            except (OSError, http.client.HTTPException):
                status = 0
                conn.close()  # the next request reconnects
            with lock:
                statuses.append(status)
        conn.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout * 4)
    return statuses


def basic_auth(client_id, secret):
    # RFC 6749 2.3.1: form-encode each part, then base64 the pair.
    pair = f"{urllib.parse.quote_plus(client_id)}:{urllib.parse.quote_plus(secret)}"
    return "Basic " + base64.b64encode(pair.encode()).decode()


def post_form(port, path, fields, auth=None, timeout=10.0):
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if auth:
        headers["Authorization"] = basic_auth(*auth)
    body = urllib.parse.urlencode(fields).encode()
    return request(port, path, headers, "POST", body, timeout)


def post_json(port, path, obj, timeout=10.0):
    body = json.dumps(obj).encode()
    return request(port, path, {"Content-Type": "application/json"}, "POST", body, timeout)
