"""``python -m service``: the supervisor. It binds the listening socket, starts the engine core process
and ``PSN_WORKERS`` front-end processes that share that socket, restarts any that dies, and on SIGTERM
or Ctrl-C stops them in order: front ends first (they finish the requests they have), then the engine
core (it runs what is still queued, up to ``PSN_DRAIN_TIMEOUT_S``).

A front end that dies loses no session (the engine core owns them); its clients reconnect and attach.
The engine core dying makes the front ends answer 503 ``engine_unavailable`` and ``/readyz`` fail until
the supervisor has restarted it (it rebuilds its sessions from the session store, ``PSN_STATE_DIR`` or
``PSN_STATE_URL``; without one they are lost: they lived in its memory). If the engine core
fails before it ever became ready (a broken model folder, a bad setting), the service exits with 1.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from prometheus_client.multiprocess import mark_process_dead

from service.config import Settings, SettingsError, check_argv, get_settings
from service.ipc import default_address, listen

log = logging.getLogger("psn.supervisor")
ctx = mp.get_context("spawn")  # no fork: children start clean (torch dislikes forked state)


class Supervisor:
    def __init__(self, settings: Settings):
        self.settings = settings
        host = f"[{settings.host}]" if ":" in settings.host else settings.host  # IPv6 literal
        self.sock = listen(f"tcp:{host}:{settings.port}", 2048)  # first: nothing to clean up if it fails
        self.address = settings.engine_address or default_address()
        self.sock.set_inheritable(True)  # handed to every front-end process
        self.engine: mp.Process | None = None
        self.frontends: list[mp.Process | None] = [None] * settings.workers
        self.stopping = False
        # front ends count their metrics in shared files (prometheus_client's multiprocess mode)
        self.metrics_dir = tempfile.mkdtemp(prefix="psn-metrics-")

    def spawn(self, p: mp.process.BaseProcess, frontend: bool) -> None:
        """Start ``p`` with PROMETHEUS_MULTIPROC_DIR set for front ends only (read when it imports)."""
        if frontend:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        else:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        try:
            p.start()
        finally:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)

    def start_engine(self) -> bool:
        """Start the engine core; False if it exited before becoming ready."""
        from service.core.proc import run_engine_core  # torch: imported in the engine core's process only

        # kept as long as the engine core: the child unpickles it while it starts, and an Event collected by
        # then (a stop during the start returns at once) has unlinked its semaphore: FileNotFoundError there
        self.engine_ready = ready = ctx.Event()
        self.engine = ctx.Process(target=run_engine_core, args=(self.settings, self.address, ready),
                                  name="psn-engine-core", daemon=False)
        self.spawn(self.engine, frontend=False)
        while not ready.wait(0.1):
            if not self.engine.is_alive():
                return False
            if self.stopping:
                return True
            self.restart_frontends()  # /healthz keeps answering while the engine core starts (seconds)
        return True

    def restart_frontends(self) -> None:
        for i, p in enumerate(self.frontends):
            if p is not None and not p.is_alive() and not self.stopping:
                log.warning("front end %d (pid %s) exited with %s; restarting it", i, p.pid, p.exitcode)
                mark_process_dead(p.pid, self.metrics_dir)
                self.start_frontend(i)

    def start_frontend(self, i: int) -> None:
        from service.frontend.worker import run_frontend

        p = ctx.Process(target=run_frontend, args=(self.settings, self.address, self.sock, i),
                        name=f"psn-frontend-{i}", daemon=False)
        self.spawn(p, frontend=True)
        self.frontends[i] = p

    def request_stop(self, *_: object) -> None:
        self.stopping = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        log.info("starting the engine core and %d front end(s) on %s:%d", self.settings.workers, self.settings.host,
                 self.sock.getsockname()[1])
        for i in range(self.settings.workers):  # front ends answer 503 not_ready until the engine core is up
            self.start_frontend(i)
        if not self.start_engine():
            log.error("the engine core exited with %s before it was ready; stopping", self.engine.exitcode)
            self.stop()
            return 1
        while not self.stopping:
            time.sleep(0.1)
            self.restart_frontends()
            if self.engine is not None and not self.engine.is_alive() and not self.stopping:
                fate = ("it rebuilds its sessions from the session store" if self.settings.state_dir
                        or self.settings.state_url else "its sessions are lost: no PSN_STATE_DIR / PSN_STATE_URL")
                log.error("the engine core (pid %s) exited with %s; restarting it (%s)", self.engine.pid,
                          self.engine.exitcode, fate)
                self.start_engine()
        self.stop()
        return 0

    def stop(self) -> None:
        """Front ends first (they finish what they have in flight), then the engine core drains."""
        log.info("stopping: front ends, then the engine core")
        # Our copy of the listening socket goes first: kept open, the kernel would go on taking connections into
        # its backlog after the front ends stop accepting, and nothing would answer them until we exit.
        self.sock.close()
        for p in self.frontends:
            if p is not None and p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        for p in self.frontends:
            if p is not None:
                p.join(40)
                if p.is_alive():
                    p.kill()
        if self.engine is not None and self.engine.is_alive():
            os.kill(self.engine.pid, signal.SIGTERM)
            self.engine.join(self.settings.drain_timeout_s + 20)
            if self.engine.is_alive():
                self.engine.kill()
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        if self.address.startswith("unix:") and not self.settings.engine_address:
            shutil.rmtree(Path(self.address[5:]).parent, ignore_errors=True)
        log.info("stopped")


def main() -> None:
    check_argv(sys.argv[1:], "python -m service", "Serve every model folder under PSN_MODEL_DIR over HTTP and "
               "WebSocket on PSN_HOST:PSN_PORT: an engine core process and PSN_WORKERS front ends.")
    try:
        settings = get_settings()
    except SettingsError as e:  # names each bad variable (a bad key by its position, never its value)
        raise e.exit("psn-stream") from None
    # Only the keys' hashes go on (in settings); children must not inherit the keys in their environment.
    os.environ.pop("PSN_API_KEYS", None)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s [supervisor %(process)d] %(message)s")
    if warning := settings.keys_file_warning:
        log.warning("%s", warning)
    try:
        supervisor = Supervisor(settings)
    except OSError as e:  # the port taken, an address not of this machine, a host name that does not resolve
        raise SystemExit(f"psn-stream: cannot listen on {settings.host}:{settings.port} (PSN_HOST, PSN_PORT): "
                         f"{e.strerror or e}") from None
    raise SystemExit(supervisor.run())
