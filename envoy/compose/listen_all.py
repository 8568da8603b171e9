#!/usr/bin/env python3
"""Run one of tests/servers/*.py so that it listens on every interface.

    python listen_all.py /srv/servers/mock_idp.py --port 9000

The test servers bind 127.0.0.1 on purpose: on a developer's machine nothing
else should reach them. In a compose network each runs in its own container,
where 127.0.0.1 is that container alone, and Envoy (another container) must
reach it by service name. This wrapper changes only the address a server binds
(127.0.0.1 becomes 0.0.0.0) and then runs the script unchanged as __main__,
with its own folder first on sys.path as `python script.py` would have it (the
servers import their neighbour serving.py). docker-compose.yaml still
publishes ports on the host's 127.0.0.1 only. (The server's startup line still
says 127.0.0.1: it prints, it does not look.)

As a container's PID 1 the process gets no default action for SIGTERM, which
`docker stop`, `podman stop` and `compose down` send: it would be ignored until
the engine kills it. SIGTERM is therefore made the KeyboardInterrupt the
servers already stop cleanly on.
"""
import os
import runpy
import signal
import socketserver
import sys

_bind = socketserver.TCPServer.server_bind


def _bind_all_interfaces(server):
    host, port = server.server_address[:2]
    if host == "127.0.0.1":
        server.server_address = ("0.0.0.0", port)
    _bind(server)


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    socketserver.TCPServer.server_bind = _bind_all_interfaces
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    script = sys.argv[1]
    sys.argv = sys.argv[1:]  # the script sees its own argv
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
