"""What every test server's main() does once its server is built: listen or say why not, serve
until interrupted, close."""
import sys


def serve(name, port, make_server):
    """Runs `make_server()` on 127.0.0.1:`port`; 2 when the port cannot be had, else 0."""
    try:
        server = make_server()
    except OSError as err:
        print(f"{name}: cannot listen on 127.0.0.1:{port}: {err.strerror}", file=sys.stderr)
        return 2
    print(f"{name}: listening on http://127.0.0.1:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
