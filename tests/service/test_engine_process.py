"""The engine core's process loop (``service.core.proc.EngineProcess``) over test_core's fake backend, run in a
thread and driven by raw sockets that speak the IPC frames as front ends do: each frame handled once, an
undecodable one skipped, answers for a front end that left dropped, and the drain on SIGTERM (an idle engine
stops at once; work still queued when the drain times out is refused, and every answer is handed over
before the connection closes)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from service.core.engine import EngineCore
from service.core.proc import EngineProcess
from service.ipc import LENGTH, frame, unpack
from tests.service.test_core import Clock, make_core


class Front:
    """A front end as the engine core sees it: one socket, requests out, frames of answers in."""

    def __init__(self, address: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(address.removeprefix("unix:"))
        self.sock.settimeout(10)

    def send(self, *requests: list) -> None:
        self.sock.sendall(frame(list(requests)))

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError(f"the engine core closed the connection ({len(data)} of {n} bytes read)")
            data += chunk
        return data

    def answers(self) -> list[list]:
        """The next frame of answers (one per engine turn)."""
        (n,) = LENGTH.unpack(self._read(LENGTH.size))
        return unpack(self._read(n))

    def answers_until_closed(self) -> dict[int, list]:
        got: dict[int, list] = {}
        while True:
            try:
                batch = self.answers()
            except EOFError as e:
                assert "(0 of 4 bytes" in str(e), e  # closed between frames, not in the middle of one
                return got
            for rid, status, body in batch:
                assert rid not in got, f"request {rid} answered twice"
                got[rid] = [status, body]


def until(check: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


@contextmanager
def engine(tmp_path: Path, **settings: Any) -> Iterator[tuple[EngineProcess, EngineCore, Clock, threading.Thread]]:
    """The loop in a thread; the core's clock stands still (batches run when the test moves it, or when
    draining), so requests stay queued as long as a test needs them to."""
    core, _, clock = make_core(**settings)
    proc = EngineProcess(core, f"unix:{tmp_path}/engine.sock")
    failed: list[BaseException] = []

    def run() -> None:
        try:
            proc.run()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            failed.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield proc, core, clock, thread
    finally:
        proc.request_stop()
        thread.join(30)
    assert not failed, f"the engine loop died: {failed[0]!r}"


def open_session(f: Front, rid: int = 1) -> str:
    f.send([rid, "open", "fake", False])
    ((got_rid, status, info),) = f.answers()
    assert (got_rid, status) == (rid, 0), info
    return info["session_id"]


def steps(rid: int, sid: str, L: int = 1) -> list:
    return [rid, "steps", sid, -1, L, np.full((L, 2), 0.5).tobytes()]


def test_each_frame_is_handled_once_and_an_undecodable_one_is_skipped(tmp_path: Path) -> None:
    with engine(tmp_path) as (proc, core, clock, thread):
        f = Front(proc.address)
        sid = open_session(f)
        f.sock.sendall(LENGTH.pack(1) + b"\xc1")  # a byte msgpack never uses
        f.send([2, "get", sid, False, ""])
        assert [[rid, status] for rid, status, _ in f.answers()] == [[2, 0]]  # not the open of frame 1 again
        f.send([3, "open", "fake", False], [4, "get", sid, False, ""])  # two requests, one frame
        assert sorted(rid for rid, _, _ in f.answers()) == [3, 4]
        assert core.sessions.count("fake") == 2 and thread.is_alive()


def test_answers_for_a_front_end_that_left_are_dropped_and_the_loop_goes_on(tmp_path: Path) -> None:
    with engine(tmp_path) as (proc, core, clock, thread):
        f = Front(proc.address)
        sid = open_session(f)
        f.send(steps(2, sid))
        until(lambda: core.has_work(), "the steps to be queued")
        f.sock.close()
        until(lambda: not proc.fronts, "the engine core to see the front end leave")
        clock.now += 1  # the batch is due now; its answer has no one to go to
        g = Front(proc.address)
        g.send([1, "get", sid, False, ""])
        ((rid, status, info),) = g.answers()
        assert (rid, status, info["steps_seen"]) == (1, 0, 1) and thread.is_alive()


def test_an_idle_engine_stops_at_once_not_after_the_drain_timeout(tmp_path: Path) -> None:
    with engine(tmp_path, drain_timeout_s=3600) as (proc, core, clock, thread):
        f = Front(proc.address)
        open_session(f)
        proc.request_stop()
        thread.join(60)  # far less than the hour the drain may take with work queued
        assert not thread.is_alive()
        assert f.answers_until_closed() == {}


def test_work_queued_past_the_drain_timeout_is_refused_and_every_answer_handed_over(tmp_path: Path) -> None:
    with engine(tmp_path, drain_timeout_s=0) as (proc, core, clock, thread):
        f = Front(proc.address)
        sid = open_session(f)
        f.send(*(steps(rid, sid) for rid in (2, 3, 4)))  # one session: one batch per engine turn
        until(lambda: core.schedulers["fake"].pending == 3, "the steps to be queued")
        proc.request_stop()
        got = f.answers_until_closed()
    assert sorted(got) == [2, 3, 4]  # each answered: applied in the drain, or refused
    refused = [rid for rid, (status, body) in got.items() if status != 0]
    assert refused and all(got[rid][0] == 503 and got[rid][1][0] == "shutting_down" for rid in refused), got


def test_a_large_answer_not_yet_read_is_handed_over_whole_when_the_engine_stops(tmp_path: Path) -> None:
    T = 200_000  # 3.2 MB of scores: far more than the socket holds while the front end does not read
    with engine(tmp_path, max_steps_per_request=T) as (proc, core, clock, thread):
        f = Front(proc.address)
        f.send([1, "classify", "fake", T, np.full((T, 2), 0.25).tobytes()])
        until(lambda: any(c.outbuf for c in proc.fronts.values()), "an answer waiting for the front end to read")
        proc.request_stop()
        got = f.answers_until_closed()
    status, (spikes, scores) = got[1]
    assert status == 0 and np.frombuffer(scores).reshape(T, 2)[-1].tolist() == [0.25 * T] * 2
