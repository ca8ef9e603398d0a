"""The engine core process: load the models, bind the ZeroMQ ROUTER, run the busy loop until SIGTERM.

The loop, per turn: wait for requests (no longer than the next batch deadline), read every message
that is there, run the due engine steps, send each front end one message with all its answers.
SIGTERM (or SIGINT) drains: new work is refused, queued work runs, then the process exits.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import torch
import zmq

from model.folder import find_model_folders, load_model_folder
from service.backends import get_backend_class
from service.config import Settings
from service.core.engine import EngineCore
from service.ipc import pack, unpack

log = logging.getLogger("psn.engine")
MAX_MESSAGES_PER_TURN = 512  # read at most this many messages before running a step (bounds latency)


def build_core(settings: Settings) -> EngineCore:
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    folders = find_model_folders(settings.model_dir)
    if not folders:
        log.warning("no model folders under %s", settings.model_dir)
    backend_cls = get_backend_class(settings.backend)
    backends = []
    for folder in folders:
        m = load_model_folder(folder, device=settings.torch_device, dtype=settings.torch_dtype)
        log.info("loaded model=%s neuron=%s device=%s dtype=%s", m.name, m.cfg.neuron, settings.torch_device,
                 settings.dtype)
        backends.append(backend_cls(m, settings.max_sessions, settings))
    core = EngineCore(backends, settings)
    if settings.warmup:
        core.warmup()
    return core


def bind(sock: zmq.Socket, address: str) -> None:
    if address.startswith("ipc://"):
        Path(address[6:]).unlink(missing_ok=True)  # a stale socket file of a crashed engine core
    sock.bind(address)


class EngineProcess:
    def __init__(self, core: EngineCore, address: str):
        self.core, self.address = core, address
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.setsockopt(zmq.RCVHWM, 100_000)
        bind(self.sock, address)
        self.stop_requested = False

    def request_stop(self, *_: object) -> None:
        self.stop_requested = True

    def receive(self, timeout_ms: int) -> None:
        if not self.sock.poll(timeout_ms):
            return
        for _ in range(MAX_MESSAGES_PER_TURN):
            try:
                front, data = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:  # not [identity, payload]: ignore
                continue
            try:
                requests = unpack(data)
            except Exception:
                log.warning("engine: undecodable message from a front end (%d bytes)", len(data))
                continue
            for req in requests:
                self.core.handle(front, req)

    def send(self) -> None:
        for front, items in self.core.take_outbox().items():
            try:
                self.sock.send_multipart([front, pack(items)], zmq.NOBLOCK)
            except zmq.Again:  # that front end is not reading (gone or stuck): its answers are dropped
                log.warning("engine: %d answers for an unresponsive front end dropped", len(items))

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
            self.receive(max(0, int(wait * 1000 + 0.999)) if deadline is None else 0)
            core.step()
            if time.monotonic() >= next_reap:
                core.reap()
                next_reap = time.monotonic() + reap_every
            self.send()
        self.sock.close(0)
        self.ctx.term()
        log.info("engine drained")


def run_engine_core(settings: Settings, address: str, ready: object | None = None) -> None:
    """Entry point of the engine core process (``ready``: a multiprocessing Event set once serving)."""
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s [engine %(process)d] %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor turns Ctrl-C into SIGTERM, in order
    core = build_core(settings)
    proc = EngineProcess(core, address)
    signal.signal(signal.SIGTERM, proc.request_stop)
    log.info("engine core ready: pid=%d, %d model(s), backend=%s, device=%s, max_sessions=%d, max_batch_size=%d, "
             "address=%s", os.getpid(), len(core.runners), settings.backend, settings.torch_device,
             settings.max_sessions, settings.max_batch_size, address)
    if ready is not None:
        ready.set()  # type: ignore[attr-defined]
    proc.run()
