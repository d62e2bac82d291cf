"""`--workers N`: N serving processes on one set of ports, under one parent.

Each worker is a whole `python -m service` on the same gRPC and HTTP ports, bound with SO_REUSEPORT, so the kernel
spreads connections among them and each has its own event loop, GIL and batchers. The parent:
- picks the ports once (a 0 becomes one free port for all), and starts the workers;
- serves /metrics for the group on --metrics-port from prometheus_client's multiprocess mode (each worker writes its
  series to files in a directory of the parent's; counters and histograms are summed, gauges combined as each
  declares in service/metrics.py);
- forwards SIGHUP (every worker rescans the repository and the tokens file) and SIGTERM/SIGINT (every worker drains
  as one server does), and exits when they have all ended, with the worst status;
- starts a worker again when one dies unexpectedly; and a worker ends when the parent dies, even by SIGKILL.
ModelAdmin is off in the workers: a call would change one worker only. The repository (`--model-control poll`, or
SIGHUP to the parent) changes them all.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from prometheus_client import multiprocess

from service.config import ServerConfig
from service.server import StartupError, bare, bind_error, group_registry, metrics_endpoint

log = logging.getLogger(__name__)

RESTART_PAUSE_S = 1.0  # between a worker's death and its replacement, so that a crash loop cannot spin
PARENT = "_GAN_WORKER_OF"  # in a worker's environment: its parent's pid (tie_to_parent)
PR_SET_PDEATHSIG = 1


def free_port(host: str) -> int:
    """A port free on `host` now (the workers bind it a moment later)."""
    address = bare(host) or "::"
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def tie_to_parent() -> None:
    """In a worker: end (SIGTERM, so it drains) when the parent that started it dies, even by SIGKILL, so that no
    orphan keeps serving on the shared port. Linux only; elsewhere the parent's own stop is all there is."""
    parent = os.environ.get(PARENT)
    if not parent or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # the parent died before the tie was made
        os.kill(os.getpid(), signal.SIGTERM)


class Group:
    def __init__(self, cfg: ServerConfig, argv: list[str]):
        self.cfg, self.argv = cfg, argv
        self.directory = ""  # where the workers' metrics go: made at the start, removed at the end
        self.ports: dict[str, int] = {}
        self.command: list[str] = []  # a worker's command line
        self.env: dict[str, str] = {}
        # Signal handlers run on the main thread between the watch loop's steps: nothing here needs a lock.
        self.workers: list[subprocess.Popen] = []
        self.stopping = False
        self.stopped: set[int] = set()  # workers sent SIGTERM

    def spawn(self) -> subprocess.Popen:
        """Start one worker and wait for its ready line."""
        worker = subprocess.Popen(self.command, stdout=subprocess.PIPE, text=True, env=self.env)
        line = worker.stdout.readline()
        try:
            json.loads(line)
        except ValueError:
            worker.kill()
            raise StartupError(f"a worker did not start (exit status {worker.wait()}); its log is above") from None
        return worker

    def run(self) -> int:
        # First: a signal from now on reaches every worker, including those still starting (watch() sees to it).
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda s, _frame: self.stop(signal.Signals(s)))
        signal.signal(signal.SIGHUP, lambda s, _frame: self.signal(signal.SIGHUP))
        cfg = self.cfg
        server = None
        try:
            ports = {name: getattr(cfg, name) for name in ("port", "http_port", "health_port")}
            try:
                self.ports = {name: free_port(cfg.host) if port == 0 else port for name, port in ports.items()}
            except OSError as e:
                raise StartupError(f"--host {cfg.host}: cannot pick a free port ({e})") from None
            self.directory = tempfile.mkdtemp(prefix="gan-metrics-")
            self.command = [
                sys.executable, "-m", "service", *self.argv, "--workers", "1", "--reuse-grpc-port", "--metrics-port",
                "-1", "--admin-api", "off",
                *(a for name, port in self.ports.items() for a in (f"--{name.replace('_', '-')}", str(port))),
            ]  # fmt: skip
            self.env = os.environ | {"PROMETHEUS_MULTIPROC_DIR": self.directory, PARENT: str(os.getpid())}
            while len(self.workers) < cfg.workers and not self.stopping:
                self.workers.append(self.spawn())
            metrics_port = -1
            if cfg.metrics_port >= 0:
                registry = group_registry(self.directory)
                try:
                    server = metrics_endpoint(cfg.metrics_port, cfg.metrics_host or cfg.host, registry)
                except OSError as e:
                    raise bind_error("metrics_port", cfg.metrics_port, e) from None
                metrics_port = server.server_port
            ready = {"event": "serving", "port": self.ports["port"], "http_port": self.ports["http_port"],
                     "metrics_port": metrics_port, "workers": len(self.workers)}  # fmt: skip
            ready |= {"health_port": self.ports["health_port"]} if cfg.health_port >= 0 else {}
            print(json.dumps(ready), flush=True)
            log.info("%d workers serving on port %d (pids %s)", len(self.workers), self.ports["port"],
                     ", ".join(str(w.pid) for w in self.workers))  # fmt: skip
            return self.watch()
        except BaseException:  # a failed start, or anything else: no worker outlives the parent's exit
            self.stop(signal.SIGTERM)
            self.watch()
            raise
        finally:
            if server is not None:
                server.shutdown()
            if self.directory:
                shutil.rmtree(self.directory, ignore_errors=True)

    def signal(self, sig: signal.Signals) -> None:
        for worker in self.workers:
            if worker.poll() is None and not (sig == signal.SIGTERM and worker.pid in self.stopped):
                worker.send_signal(sig)
                if sig == signal.SIGTERM:
                    self.stopped.add(worker.pid)

    def stop(self, sig: signal.Signals) -> None:
        if not self.stopping:
            log.info("%s: draining %d workers", sig.name, len(self.workers))
        self.stopping = True
        self.signal(signal.SIGTERM)

    def watch(self) -> int:
        """Until every worker has ended after a stop: keep cfg.workers running (a worker that dies on its own is
        replaced, and a failed start is tried again); then the worst exit status of the stop."""
        status = 0
        while True:
            live = []
            for worker in self.workers:
                if worker.poll() is None:
                    live.append(worker)
                    continue
                multiprocess.mark_process_dead(worker.pid, self.directory)
                if self.stopping:  # a worker replaced earlier does not count against the group
                    status = max(status, abs(worker.returncode))
                else:
                    log.error("worker %d exited with status %d; starting another", worker.pid, worker.returncode)
            self.workers = live
            if self.stopping:  # a worker started while the stop came in is stopped too
                if not live:
                    return status
                if any(w.pid not in self.stopped for w in live):
                    self.signal(signal.SIGTERM)
            elif len(live) < self.cfg.workers:
                time.sleep(RESTART_PAUSE_S)  # so that a crash loop cannot spin
                try:
                    self.workers.append(self.spawn())
                except StartupError as e:
                    log.error("%s; trying again", e)
            time.sleep(0.1)
