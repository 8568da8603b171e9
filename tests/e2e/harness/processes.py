"""Waiting, free ports, and processes that die with the run."""
import atexit
import ctypes
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .paths import LOOPBACK


def wait_until(predicate, timeout, interval=0.05, what="condition"):
    """Poll predicate until it returns a truthy value; raise TimeoutError after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


_handed_out = set()
_ports_lock = threading.Lock()


def free_port():
    """A loopback port nothing listens on now (and that this run has not handed out)."""
    with _ports_lock:
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((LOOPBACK, 0))
                port = s.getsockname()[1]
            if port not in _handed_out:
                _handed_out.add(port)
                return port


def port_accepts(port, timeout=0.2):
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- processes


PR_SET_PDEATHSIG = 1


def _die_with_parent():
    # Runs in the child before exec: even a SIGKILLed pytest takes its servers with it.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path
    on_stop: list = field(default_factory=list)  # cleanups to run once the group is dead

    def alive(self):
        return self.popen.poll() is None

    def log_text(self):
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines=40):
        return "\n".join(self.log_text().splitlines()[-lines:])


class Processes:
    """Starts processes in their own process groups and guarantees they die with the run."""

    def __init__(self):
        self._procs = []
        self._lock = threading.Lock()
        atexit.register(self.stop_all)

    def start(self, name, argv, log_path, env=None, cwd=None):
        log_path = Path(log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                [str(a) for a in argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,  # its own process group: killpg reaches its children too
                preexec_fn=_die_with_parent,
            )
        proc = Proc(name, popen, log_path)
        with self._lock:
            self._procs.append(proc)
        return proc

    def stop(self, proc, grace=5.0):
        if proc.alive():
            self._signal(proc, signal.SIGTERM)
            try:
                proc.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self._signal(proc, signal.SIGKILL)
                proc.popen.wait(grace)
        # The group may hold children that outlived the leader.
        self._signal(proc, signal.SIGKILL)
        for cleanup in proc.on_stop:
            cleanup()
        proc.on_stop.clear()
        with self._lock:
            if proc in self._procs:
                self._procs.remove(proc)

    def stop_all(self):
        with self._lock:
            procs = list(self._procs)
        for proc in reversed(procs):
            self.stop(proc)

    @staticmethod
    def _signal(proc, sig):
        try:
            os.killpg(proc.popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def wait_for_port(proc, port, timeout=15.0):
    """Wait until proc listens on port; fail with its log if it dies first."""

    def ready():
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        return port_accepts(port)

    wait_until(ready, timeout, what=f"{proc.name} to listen on {port}")
