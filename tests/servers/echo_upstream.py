#!/usr/bin/env python3
"""The protected upstream: answers any request with 200 and what it received.

    python echo_upstream.py --port 9100

Body: {"method", "path", "headers": {lower-case name: value, or a list if repeated}, "body"}.
Tests read it to see exactly which headers got past the filter.
"""
import argparse
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from serving import serve


class EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "echo-upstream/1"

    def log_message(self, fmt, *args):
        # Silent: the request log would show the Authorization headers that tests send.
        pass

    def read_body(self):
        if (self.headers.get("Transfer-Encoding") or "").lower() == "chunked":
            return self.read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def read_chunked(self):
        body = b""
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                # Trailers end with an empty line.
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return body
            body += self.rfile.read(size)
            self.rfile.readline()

    def echo(self):
        headers = {}
        for name, value in self.headers.items():
            name = name.lower()
            if name in headers:
                prior = headers[name]
                headers[name] = (prior if isinstance(prior, list) else [prior]) + [value]
            else:
                headers[name] = value
        body = self.read_body()
        payload = json.dumps(
            {
                "method": self.command,
                "path": self.path,
                "headers": headers,
                "body": body.decode("utf-8", "replace"),
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = echo


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    return serve("echo-upstream", args.port, lambda: Server(("127.0.0.1", args.port), EchoHandler))

if __name__ == "__main__":
    sys.exit(main())
