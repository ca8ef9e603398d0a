"""The engine core process: load the models, listen for front ends, run the busy loop until SIGTERM.

The loop, per turn: wait for requests (no longer than the next batch deadline), read every frame
that is there, run the due engine steps, send each front end one frame with all its answers.
Sockets are non-blocking and served by one ``selectors`` loop: no threads.
SIGTERM (or SIGINT) drains: new work is refused, queued work runs, then the process exits.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import selectors
import signal
import socket
import time

import torch

from model.folder import find_model_folders, load_model_folder
from service import logs
from service.backends import get_backend_class
from service.config import BadSetting, Settings, SettingsError
from service.core.cluster import ClusterStore
from service.core.engine import EngineCore
from service.core.journal import open_store
from service.ipc import LENGTH, MAX_FRAME, frame, listen, unpack
from service.lifetime import die_with_parent, spawned_by
from service.memory import keep_freed_memory

log = logging.getLogger("psn.engine")
READ_SIZE = 1 << 20
MAX_READS_PER_TURN = 8  # per front end and turn, so one busy front end cannot hold the loop
MAX_BACKLOG = 256 << 20  # answers a front end has not read; past it the front end is cut off


def build_core(settings: Settings) -> EngineCore:
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    if not settings.model_dir.is_dir():  # a typo would serve no model at all, every request a 404
        raise BadSetting(f"PSN_MODEL_DIR: {str(settings.model_dir)!r} is not a folder (it should hold one "
                         "folder per model, each with a config.json)")
    folders = find_model_folders(settings.model_dir)
    if not folders:  # a service of no models answers 404 to everything: say why at once instead
        hint = (f"; {str(settings.model_dir)!r} is a model folder itself: set PSN_MODEL_DIR to the folder that holds "
                "it" if (settings.model_dir / "config.json").is_file() else "")
        raise BadSetting(f"PSN_MODEL_DIR: no model folders under {str(settings.model_dir)!r} (each model is a folder "
                         f"with a config.json, directly under it){hint}")
    backend_cls = get_backend_class(settings.backend)
    backends = []
    for folder in folders:
        m = load_model_folder(folder, device=settings.torch_device, dtype=settings.torch_dtype)
        log.info("loaded model=%s neuron=%s device=%s dtype=%s", m.name, m.cfg.neuron, settings.torch_device,
                 settings.dtype)
        backends.append(backend_cls(m, settings.max_sessions, settings))
    if settings.cluster:
        if not settings.state_url:
            raise BadSetting("PSN_CLUSTER=1 needs PSN_STATE_URL=redis://... (the sessions replicas share)")
        cluster = ClusterStore(settings.state_url, settings.replica_id, settings.cluster_prefix,
                               live_ttl_s=max(2 * settings.idle_timeout_s, 600.0))
        core = EngineCore(backends, settings, cluster=cluster)
        store = None
    else:
        store = open_store(settings.state_dir, settings.state_url, settings.state_fsync)
        core = EngineCore(backends, settings, store=store)
    if settings.warmup:
        core.warmup()
    if store is not None or settings.cluster:
        core.recover()  # before the engine turns ready: every logged session is back, or answered session_lost
    return core


class FrontConnection:
    """One front end: its socket, bytes read but not yet framed, bytes not yet sent."""

    def __init__(self, sock: socket.socket, ident: bytes):
        self.sock, self.ident = sock, ident
        self.inbuf = bytearray()
        self.outbuf = bytearray()


class EngineProcess:
    def __init__(self, core: EngineCore, address: str):
        self.core, self.address = core, address
        self.listener = listen(address, 256)
        self.listener.setblocking(False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.listener, selectors.EVENT_READ, None)
        self.fronts: dict[bytes, FrontConnection] = {}
        self._next_ident = 0
        self.stop_requested = False

    def request_stop(self, *_: object) -> None:
        self.stop_requested = True

    # ----- in ----------------------------------------------------------------------------------
    def receive(self, timeout: float) -> None:
        for key, mask in self.sel.select(timeout):
            if key.data is None:
                self._accept()
                continue
            conn: FrontConnection = key.data
            if mask & selectors.EVENT_WRITE:
                self._write(conn)
            if mask & selectors.EVENT_READ and conn.ident in self.fronts:
                self._read(conn)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            sock.setblocking(False)
            self._next_ident += 1
            conn = FrontConnection(sock, self._next_ident.to_bytes(8, "little"))
            self.fronts[conn.ident] = conn
            self.sel.register(sock, selectors.EVENT_READ, conn)
            log.info("engine: a front end connected (%d connected)", len(self.fronts))

    def _read(self, conn: FrontConnection) -> None:
        for _ in range(MAX_READS_PER_TURN):
            try:
                data = conn.sock.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                data = b""
            if not data:
                self._drop(conn)
                return
            conn.inbuf += data
            if len(data) < READ_SIZE:
                break
        buf, off = conn.inbuf, 0
        while len(buf) - off >= LENGTH.size:
            (n,) = LENGTH.unpack_from(buf, off)
            if n > MAX_FRAME:
                log.warning("engine: a front end sent a %d-byte frame; closing its connection", n)
                self._drop(conn)
                return
            if len(buf) - off - LENGTH.size < n:
                break
            start = off + LENGTH.size
            try:
                requests = unpack(memoryview(buf)[start:start + n])
            except Exception:
                log.warning("engine: undecodable frame from a front end (%d bytes)", n)
                requests = []
            off = start + n
            for req in requests:
                self.core.handle(conn.ident, req)
        del buf[:off]

    def _drop(self, conn: FrontConnection) -> None:
        if self.fronts.pop(conn.ident, None) is None:
            return
        self.sel.unregister(conn.sock)
        conn.sock.close()
        log.info("engine: a front end disconnected (%d connected)", len(self.fronts))

    # ----- out ---------------------------------------------------------------------------------
    def send(self) -> None:
        self.core.flush_log()  # the log first: no answer leaves before what it answers is recorded
        for ident, items in self.core.take_outbox().items():
            conn = self.fronts.get(ident)
            if conn is None:  # that front end has gone: its answers have no one to go to
                continue
            conn.outbuf += frame(items)
            self._write(conn)

    def _write(self, conn: FrontConnection) -> None:
        try:
            sent = conn.sock.send(conn.outbuf)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._drop(conn)
            return
        del conn.outbuf[:sent]
        if len(conn.outbuf) > MAX_BACKLOG:
            log.warning("engine: a front end is not reading (%d bytes unsent); closing its connection",
                        len(conn.outbuf))
            self._drop(conn)
            return
        self.sel.modify(conn.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.outbuf else 0), conn)

    # ----- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        core, settings = self.core, self.core.settings
        reap_every = min(1.0, settings.idle_timeout_s / 4)
        next_reap = time.monotonic() + reap_every
        deadline = None
        core.ready = True
        while True:
            if self.stop_requested and deadline is None:
                core.begin_drain()
                deadline = time.monotonic() + settings.drain_timeout_s
                log.info("engine draining (%s)", "work queued" if core.has_work() else "idle")
            if deadline is not None and (not core.has_work() or time.monotonic() > deadline):
                core.refuse_pending()
                self.send()
                break
            wait = core.wait_s()
            now = time.monotonic()
            wait = next_reap - now if wait is None else min(wait, next_reap - now)
            self.receive(max(0.0, wait) if deadline is None else 0.0)
            core.step()
            if time.monotonic() >= next_reap:
                core.reap()
                next_reap = time.monotonic() + reap_every
            self.send()
        for conn in list(self.fronts.values()):  # best effort: hand over the last answers
            with contextlib.suppress(OSError):
                conn.sock.setblocking(True)
                conn.sock.settimeout(1.0)
                conn.sock.sendall(conn.outbuf)
            self._drop(conn)
        self.listener.close()
        log.info("engine drained")


def run_engine_core(settings: Settings, address: str, ready: object | None = None) -> None:
    """Entry point of the engine core process (``ready``: a multiprocessing Event set once serving)."""
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s [engine %(process)d] %(message)s")
    logs.install()
    die_with_parent(parent=spawned_by())  # no engine core or front end outlives a supervisor killed with SIGKILL
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor turns Ctrl-C into SIGTERM, in order
    kept = keep_freed_memory(settings.malloc_keep_mb)  # before the models load: every batch reuses its memory
    try:
        core = build_core(settings)
    except SettingsError as e:  # a bad PSN_* variable: its own message, no traceback (the supervisor stops)
        log.error("%s", e)
        raise SystemExit(1) from None
    gc.collect()
    gc.freeze()  # torch and the models live as long as the process: keep them out of every collection
    proc = EngineProcess(core, address)
    signal.signal(signal.SIGTERM, proc.request_stop)
    log.info("engine core ready: pid=%d, %d model(s), backend=%s, device=%s, max_sessions=%d, max_batch_size=%d, "
             "freed memory kept=%s, address=%s", os.getpid(), len(core.runners), settings.backend,
             settings.torch_device, settings.max_sessions, settings.max_batch_size,
             f"{settings.malloc_keep_mb} MB" if kept else "no", address)
    if ready is not None:
        ready.set()  # type: ignore[attr-defined]
    proc.run()
