"""The engine core's parts with injected time: the scheduler, the session table, the retry window, and
EngineCore over a fake backend (so each decision is visible, not only its effect through the server)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from model.folder import LoadedModel
from model.network import LayerConfig, NetConfig, PSNNet
from service.backends.torch_backend import TorchBackend
from service.config import Settings
from service.core.engine import EngineCore, split_levels
from service.core.journal import OPEN, STEPS, FileStore, frame, frame_parts
from service.core.scheduler import Request, Scheduler
from service.core.sessions import RetryWindow, Session, SessionTable, _check, id_tag
from service.errors import SessionGone, SessionNotFound, TooManySessions


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def req(s: Session, t: float, op: str = "steps") -> Request:
    return Request(b"f", 1, s, op, t)


# ----- scheduler ---------------------------------------------------------------------------------
def test_batch_waits_for_max_wait_unless_full() -> None:
    sched = Scheduler(max_batch_size=3, max_wait_s=0.01)
    a, b, c = (Session(str(i), "m", i, 0.0) for i in range(3))
    assert sched.wait_s(0.0) is None and sched.schedule(0.0) == []
    sched.add(req(a, 1.000))
    sched.add(req(b, 1.004))
    assert sched.wait_s(1.005) == pytest.approx(0.005)  # the oldest (a) is 5 ms old of 10
    assert sched.schedule(1.005) == []  # not due: not full, not old enough
    assert [r.session for r in sched.schedule(1.005, force=True)] == [a, b]  # draining takes it anyway
    a, b, c = (Session(str(i), "m", i, 0.0) for i in range(3))  # fresh queues
    sched = Scheduler(max_batch_size=3, max_wait_s=0.01)
    for s in (a, b):
        sched.add(req(s, 1.0))
    assert sched.schedule(1.0099) == []
    assert len(sched.schedule(1.0101)) == 2  # due by age
    a, b, c = (Session(str(i), "m", i, 0.0) for i in range(3))
    sched = Scheduler(max_batch_size=3, max_wait_s=10)
    for s in (a, b, c):
        sched.add(req(s, 1.0))
    assert sched.wait_s(1.0) == 0.0 and len(sched.schedule(1.0)) == 3  # full: due at once


def test_one_request_per_session_per_batch_round_robin() -> None:
    sched = Scheduler(max_batch_size=2, max_wait_s=0)
    a, b, c = (Session(n, "m", i, 0.0) for i, n in enumerate("abc"))
    for _ in range(3):
        sched.add(req(a, 0.0))  # a floods
    sched.add(req(b, 0.0))
    sched.add(req(c, 0.0))
    order = []
    while True:
        batch = sched.schedule(1.0)
        if not batch:
            break
        ids = [r.session.id for r in batch]
        assert len(set(ids)) == len(ids)  # distinct sessions in a batch
        order.append(ids)
        sched.done(batch)
    assert order == [["a", "b"], ["c", "a"], ["a"]]  # b and c are not starved behind a's flood
    assert sched.pending == 0 and not a.queue


def test_drop_removes_a_sessions_queue() -> None:
    sched = Scheduler(max_batch_size=4, max_wait_s=0)
    a, b = Session("a", "m", 0, 0.0), Session("b", "m", 1, 0.0)
    sched.add(req(a, 0.0))
    sched.add(req(a, 0.0))
    sched.add(req(b, 0.0))
    assert len(sched.drop(a)) == 2 and sched.pending == 1
    assert [r.session for r in sched.schedule(0.0)] == [b]


# ----- session table ---------------------------------------------------------------------------
def test_expiry_is_by_idleness_not_age_and_busy_sessions_never_expire() -> None:
    clock = Clock()
    table = SessionTable(idle_timeout_s=10, remember_gone=100, clock=clock)
    table.add_model("m", 3)
    old, idle, busy = table.open("m"), table.open("m"), table.open("m")
    with pytest.raises(TooManySessions):
        table.open("m")
    clock.now += 8
    old.last_used = clock.now  # used recently: its age (8 s) does not matter
    busy.queue.append(object())  # has a request waiting
    clock.now += 5  # idle: 13 s; old: 5 s since its last use; busy: 13 s but busy
    assert table.expire_idle() == [idle]
    with pytest.raises(SessionGone) as e:
        table.get(idle.id)
    assert e.value.code == "session_expired"
    clock.now += 100
    assert table.expire_idle() == [old]
    busy.queue.clear()
    assert table.expire_idle() == [busy]
    with pytest.raises(SessionNotFound):
        table.get("never-existed")
    assert table.count("m") == 0 and table.open("m").slot in (0, 1, 2)


def test_closed_ids_are_remembered_up_to_the_limit() -> None:
    table = SessionTable(idle_timeout_s=10, remember_gone=2, clock=Clock())
    table.add_model("m", 4)
    ss = [table.open("m") for _ in range(3)]
    for s in ss:
        table.close(s)
    with pytest.raises(SessionNotFound):  # the oldest was forgotten
        table.get(ss[0].id)
    for s in ss[1:]:
        with pytest.raises(SessionGone) as e:
            table.get(s.id)
        assert e.value.code == "session_closed"


def test_an_id_opened_again_is_live_not_remembered_as_gone() -> None:
    """An OIP sequence started again closes its session and opens one of the same id: the id must leave
    the ended ids, which the session log's compaction writes as ended."""
    table = SessionTable(idle_timeout_s=10, remember_gone=4, clock=Clock())
    table.add_model("m", 4)
    table.close(table.open("m", "oip::m:7", owner="k"))
    assert table.gone() == [("oip::m:7", "session_closed", "k")]
    s = table.open("m", "oip::m:7", owner="k")
    assert table.gone() == [] and table.get("oip::m:7", owner="k") is s
    table.close(s, "session_expired")
    assert table.gone() == [("oip::m:7", "session_expired", "k")]


@pytest.mark.parametrize(("idle", "after"), [(5.0, 5.0), (600.0, 30.0)])
def test_a_full_model_says_when_to_retry(idle: float, after: float) -> None:
    """A slot frees at the latest when an idle session expires; past 30 s a client should ask again anyway."""
    table = SessionTable(idle_timeout_s=idle, remember_gone=4, clock=Clock())
    table.add_model("m", 1)
    table.open("m")
    with pytest.raises(TooManySessions) as e:
        table.open("m")
    assert e.value.retry_after == after and f"idle timeout {idle:g} s" in str(e.value)


def test_retry_window_keeps_the_last_steps_of_each_slot() -> None:
    w = RetryWindow(slots=3, size=4, spike_bytes=1, classes=2, dtype=np.dtype(np.float32))
    # slot 2 takes steps 0..5 (in chunks 0..2 and 3..5), slot 0 takes step 0..1
    for slots, t0, L in (([2, 0], [0, 0], 3), ([2], [3], 3)):
        t = np.array(t0)[:, None] + np.arange(L)[None]  # (B, L) step indexes
        sp = (t * 10 + np.array(slots)[:, None]).astype(np.uint8)[..., None]
        sc = np.stack([t, -t], -1).astype(np.float32)
        w.write(np.array(slots), np.array(t0), sp, sc)
    assert w.first_kept(6) == 2
    sp, sc = w.read(2, 2, 4)
    assert sp[:, 0].tolist() == [22, 32, 42, 52] and sc[:, 0].tolist() == [2, 3, 4, 5]
    sp, sc = w.read(0, 0, 3)
    assert sp[:, 0].tolist() == [0, 10, 20]


# ----- the engine core over a fake backend -----------------------------------------------------
class FakeBackend:
    """Records each call; spikes = (x > 0) of the first input, scores = the running sum of x (per slot)."""

    def __init__(self, max_slots: int):
        cfg = NetConfig(input_shape=(2,), num_classes=2, layers=(LayerConfig("linear", 2),), neuron="sliding", k=2)
        self.model = LoadedModel(name="fake", path=Path("."), net=PSNNet(cfg), config={})
        self.max_slots, self.dtype = max_slots, torch.float64
        self.sums = torch.zeros(max_slots, 2, dtype=torch.float64)
        self.calls: list[tuple[int, list[int]]] = []
        self.fail = False  # every call fails
        self.fail_L: int | None = None  # calls of this many steps fail, after changing their slots' state

    def reset(self, slots: torch.Tensor) -> None:
        self.sums[slots] = 0

    def run(self, x: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fail:
            raise RuntimeError("device lost")
        if self.fail_L == x.shape[0]:
            self.sums[slots] += 1  # half-updated, as a call that dies part-way may leave them
            raise RuntimeError("device lost part-way")
        self.calls.append((x.shape[0], slots.tolist()))
        scores = self.sums[slots] + x.cumsum(0)  # (L, B, 2)
        self.sums[slots] = scores[-1]
        return (x > 0).to(self.dtype), scores

    def classify(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fail:
            raise RuntimeError("device lost")
        return (x > 0).to(self.dtype), x.cumsum(0)


def make_core(**settings) -> tuple[EngineCore, FakeBackend, Clock]:
    clock = Clock()
    be = FakeBackend(4)
    core = EngineCore([be], Settings(**{"max_batch_size": 8, "max_wait_ms": 5, "retry_window": 3, "warmup": False,
                                        "idle_timeout_s": 10, **settings}), clock=clock)
    return core, be, clock


def answers(core: EngineCore) -> dict[int, list]:
    return {rid: [status, body] for rid, status, body in core.take_outbox().get(b"f", [])}


def test_engine_core_batches_orders_and_answers_each_request_once() -> None:
    core, be, clock = make_core()
    core.handle(b"f", [1, "open", "fake", True])
    core.handle(b"f", [2, "open", "fake", False])
    opened = answers(core)
    a, b = (opened[i][1]["session_id"] for i in (1, 2))
    x = np.arange(12, dtype=np.float64).reshape(6, 2) - 5
    core.handle(b"f", [3, "steps", a, -1, 2, x[:2].tobytes()])
    core.handle(b"f", [4, "steps", a, -1, 1, x[2:3].tobytes()])  # queued behind request 3
    core.handle(b"f", [5, "steps", b, -1, 2, x[:2].tobytes()])
    assert core.step() is False and be.calls == []  # not due before max_wait (5 ms)
    clock.now += 0.006
    assert core.step() is True
    assert be.calls == [(2, [0, 1])]  # one backend call: a's first request and b's, same L
    got = answers(core)
    assert sorted(got) == [3, 5]
    start, replayed, seen, spikes, scores = got[3][1]
    assert (start, replayed, seen) == (0, 0, 2)
    assert np.frombuffer(scores).reshape(2, 2).tolist() == np.cumsum(x[:2], 0).tolist()
    assert np.unpackbits(np.frombuffer(spikes, np.uint8), bitorder="little").reshape(2, 8)[:, :2].tolist() == \
        (x[:2] > 0).astype(int).tolist()
    clock.now += 0.006
    core.step()
    assert be.calls[-1] == (1, [0]) and answers(core)[4][1][:3] == [2, 0, 3]
    assert core.step() is False and answers(core) == {}  # nothing left, nothing answered twice


def test_engine_core_retries_gaps_and_window() -> None:
    core, be, clock = make_core(max_wait_ms=0)
    core.handle(b"f", [1, "open", "fake", False])
    a = answers(core)[1][1]["session_id"]
    x = np.arange(20, dtype=np.float64).reshape(10, 2)
    core.handle(b"f", [2, "steps", a, -1, 5, x[:5].tobytes()])
    core.step()
    first = answers(core)[2][1]
    core.handle(b"f", [3, "steps", a, 3, 4, x[3:7].tobytes()])  # steps 3, 4 again, 5, 6 new
    core.handle(b"f", [4, "steps", a, 9, 1, x[9:].tobytes()])  # a gap: step 7 is next
    core.handle(b"f", [5, "steps", a, 0, 1, x[:1].tobytes()])  # older than the window (last 3)
    for _ in range(3):
        core.step()
    got = answers(core)
    start, replayed, seen, spikes, scores = got[3][1]
    assert (start, replayed, seen) == (3, 2, 7)
    assert np.frombuffer(scores).reshape(4, 2)[:2].tolist() == np.frombuffer(first[4]).reshape(5, 2)[3:].tolist()
    assert np.frombuffer(scores).reshape(4, 2).tolist() == np.cumsum(x[:7], 0)[3:].tolist()
    assert be.calls[-1] == (2, [0])  # only the two new steps reached the backend
    assert got[4][0] == 409 and got[4][1][0] == "step_gap" and got[4][1][2] == "start"
    assert got[5][0] == 409 and got[5][1][0] == "retry_too_old" and "before 4" in got[5][1][1]


def bits(spikes: bytes, L: int) -> list[list[int]]:
    """The first two spikes of each of L steps (the fake backend has 2 outputs, packed in one byte)."""
    return np.unpackbits(np.frombuffer(spikes, np.uint8), bitorder="little").reshape(L, 8)[:, :2].tolist()


def test_a_retry_inside_the_window_answers_exactly_those_steps_in_order() -> None:
    """Retries that end before the latest step, and ones that run on past it, answer their steps in
    index order: window first, then the new ones; spikes and scores both."""
    core, be, clock = make_core(max_wait_ms=0, retry_window=4)
    core.handle(b"f", [1, "open", "fake", False])
    a = answers(core)[1][1]["session_id"]
    x = np.array([[1, -1], [-1, 1], [1, 1], [-1, -1], [1, -1], [-1, 1], [1, 1], [-1, -1], [1, -1]], np.float64)
    core.handle(b"f", [2, "steps", a, -1, 7, x[:7].tobytes()])
    core.step()
    answers(core)
    calls = len(be.calls)
    core.handle(b"f", [3, "steps", a, 4, 2, x[4:6].tobytes()])  # steps 4, 5 of 0..6: the middle of the window
    core.handle(b"f", [4, "steps", a, 5, 4, x[5:9].tobytes()])  # 5, 6 again, 7, 8 new
    core.step()
    core.step()
    got = answers(core)
    start, replayed, seen, spikes, scores = got[3][1]
    assert (start, replayed, seen) == (4, 2, 7) and len(be.calls) == calls + 1
    assert bits(spikes, 2) == (x[4:6] > 0).astype(int).tolist()
    assert np.frombuffer(scores).reshape(2, 2).tolist() == np.cumsum(x[:7], 0)[4:6].tolist()
    start, replayed, seen, spikes, scores = got[4][1]
    assert (start, replayed, seen) == (5, 2, 9) and be.calls[-1] == (2, [0])
    assert bits(spikes, 4) == (x[5:9] > 0).astype(int).tolist()
    assert np.frombuffer(scores).reshape(4, 2).tolist() == np.cumsum(x, 0)[5:9].tolist()


def test_classify_requests_past_one_batch_run_in_the_next() -> None:
    core, be, clock = make_core(max_batch_size=3)
    for rid in range(7):
        core.handle(b"f", [rid, "classify", "fake", 1, np.full(2, float(rid)).tobytes()])
    assert core.wait_s() == 0.0
    assert core.step() is True and sorted(answers(core)) == [0, 1, 2]
    core.step()
    core.step()
    got = answers(core)
    assert sorted(got) == [3, 4, 5, 6]
    assert all(np.frombuffer(got[rid][1][1]).tolist() == [rid, rid] for rid in got)
    assert core.wait_s() is None and core.step() is False


def test_the_engine_waits_for_the_first_due_batch_of_any_model_and_bounds_each_models_queue() -> None:
    clock, other = Clock(), FakeBackend(4)
    other.model = LoadedModel(name="other", path=Path("."), net=other.model.net, config={})
    core = EngineCore([FakeBackend(4), other], Settings(**{"max_batch_size": 8, "max_wait_ms": 5, "warmup": False,
                                                          "queue_depth": 2}), clock=clock)
    core.handle(b"f", [1, "open", "fake", False])
    core.handle(b"f", [2, "open", "other", False])
    opened = answers(core)
    a, b = (opened[i][1]["session_id"] for i in (1, 2))
    assert core.wait_s() is None
    core.handle(b"f", [3, "steps", a, -1, 1, np.ones(2).tobytes()])
    clock.now += 0.003
    core.handle(b"f", [4, "steps", b, -1, 1, np.ones(2).tobytes()])
    assert core.wait_s() == pytest.approx(0.002)  # fake's batch is due first
    for rid in (5, 6, 7):  # a model's queue holds queue_depth requests, then says queue_full
        core.handle(b"f", [rid, "classify", "other", 1, np.ones(2).tobytes()])
    got = answers(core)
    assert list(got) == [7] and got[7][0] == 503 and got[7][1][0] == "queue_full"


def test_a_sequence_with_requests_in_flight_cannot_start_over() -> None:
    core, be, clock = make_core(max_wait_ms=1000)
    core.handle(b"f", [1, "open", "fake", False, "oip::fake:7"])
    core.handle(b"f", [2, "steps", "oip::fake:7", -1, 1, np.ones(2).tobytes()])
    core.handle(b"f", [3, "open", "fake", False, "oip::fake:7"])  # request 2 not run yet
    got = answers(core)
    assert got[3][0] == 409 and got[3][1][0] == "sequence_busy" and got[3][1][2] == "sequence_start"
    clock.now += 2
    core.step()
    assert answers(core)[2][1][:3] == [0, 0, 1]  # the request in flight was applied to the old run
    core.handle(b"f", [4, "open", "fake", False, "oip::fake:7"])  # now it starts over
    assert answers(core)[4][1]["steps_seen"] == 0


def test_a_sequence_request_opens_steps_and_ends_as_one_operation() -> None:
    """An OIP request's start, steps and end are one engine operation: a start racing another start is
    refused (not run on top of the other's steps), an end closes only the run it ended (a new start waits
    for that close), and a request queued behind the end is refused, not applied."""
    core, be, clock = make_core(max_wait_ms=1000)
    sid, one = "oip::fake:7", np.ones(2).tobytes()

    def seq(rid: int, start: bool, end: bool, x: float = 1.0) -> None:
        core.handle(b"f", [rid, "sequence", sid, "fake", start, end, 1, np.full(2, x).tobytes()])

    seq(1, True, False)
    seq(2, True, False)  # a second start before the first one's steps ran
    got = answers(core)
    assert list(got) == [2] and got[2][0] == 409 and got[2][1][0] == "sequence_busy"
    clock.now += 2
    core.step()
    assert answers(core)[1][1][:3] == [0, 0, 1]  # from a fresh state
    seq(3, False, True)  # ends the run...
    seq(4, False, False)  # ...and this one, sent after the end, is not applied
    seq(5, True, False)  # a new start while the end's close is still queued: busy, and nothing reset
    assert answers(core)[5][1][0] == "sequence_busy"
    for _ in range(3):
        clock.now += 2
        core.step()
    got = answers(core)
    assert got[3][1][:3] == [1, 0, 2] and got[4][0] == 410 and got[4][1][0] == "session_closed"
    assert sid not in core.sessions.live
    seq(6, True, True, 2.0)  # a fresh run of the same id, started and ended in one request
    clock.now += 2
    core.step()
    core.step()
    assert answers(core)[6][1][:3] == [0, 0, 1] and sid not in core.sessions.live
    core.handle(b"f", [7, "steps", sid, -1, 1, one])
    assert answers(core)[7][1][0] == "session_closed"


def test_a_sequence_end_closes_in_the_turn_of_its_steps_so_a_next_start_is_fresh() -> None:
    """A client that sends sequence_end, reads the answer and starts the same id again gets a fresh run,
    never 409 sequence_busy: the close runs in the engine turn that answers the end (Triton's order)."""
    core, be, clock = make_core(max_wait_ms=1000)
    sid = "oip::fake:8"
    for rid, start, end in ((1, True, False), (2, False, True), (3, True, True)):
        core.handle(b"f", [rid, "sequence", sid, "fake", start, end, 1, np.ones(2).tobytes()])
        clock.now += 2
        assert core.step()
        got = answers(core)
        assert got[rid][0] == 0, got
        assert (sid in core.sessions.live) is (not end)
        if not end:
            continue
        assert got[rid][1][:3] == ([1, 0, 2] if rid == 2 else [0, 0, 1])  # 3 started from a fresh state
    assert core.schedulers["fake"].pending == 0 and not core.schedulers["fake"].ready


def test_a_sequence_end_without_room_for_its_steps_is_refused_whole() -> None:
    """The steps and the close behind them are queued together or not at all: steps queued alone would be
    applied while the client is told 429."""
    core, be, clock = make_core(max_wait_ms=1000, session_queue=2)
    sid = "oip::fake:8"
    core.handle(b"f", [1, "sequence", sid, "fake", True, False, 1, np.ones(2).tobytes()])
    core.handle(b"f", [2, "sequence", sid, "fake", False, False, 1, np.ones(2).tobytes()])
    core.handle(b"f", [3, "sequence", sid, "fake", False, True, 1, np.ones(2).tobytes()])  # 2 queued: full
    assert answers(core)[3][1][0] == "session_queue_full"
    clock.now += 2
    core.step()
    core.step()
    got = answers(core)
    assert got[1][1][:3] == [0, 0, 1] and got[2][1][:3] == [1, 0, 2]
    assert core.sessions.live[sid].t == 2  # request 3 applied nothing, and closed nothing


def test_engine_core_expiry_pushes_to_watchers_and_close_waits_for_queued_work() -> None:
    core, be, clock = make_core(max_wait_ms=1000)
    core.handle(b"f", [1, "open", "fake", True])
    core.handle(b"f", [2, "open", "fake", False])
    opened = answers(core)
    a, b = (opened[i][1]["session_id"] for i in (1, 2))
    core.handle(b"f", [3, "steps", b, -1, 1, np.zeros(2).tobytes()])
    core.handle(b"f", [4, "close", b])  # queued behind request 3
    assert answers(core) == {}
    clock.now += 11  # both idle 11 s by the clock, but b has queued work
    assert [s.id for s in core.reap()] == [a]
    assert core.take_outbox() == {b"f": [[0, "expired", a]]}
    clock.now += 2  # request 3 is due (max_wait 1 s)
    core.step()  # request 3 runs
    core.step()  # then the close behind it
    got = answers(core)
    assert got[3][0] == 0 and got[4][0] == 0 and got[4][1]["steps_seen"] == 1
    core.handle(b"f", [5, "steps", b, -1, 1, np.zeros(2).tobytes()])
    assert answers(core)[5][1][0] == "session_closed"


def test_backend_failure_loses_the_sessions_of_that_call_and_the_loop_keeps_serving() -> None:
    core, be, clock = make_core(max_wait_ms=0)
    for rid in (1, 2):
        core.handle(b"f", [rid, "open", "fake", False])
    opened = answers(core)
    a, b = (opened[i][1]["session_id"] for i in (1, 2))
    be.fail_L = 2  # b's call (2 steps) fails after touching its slot; a's call (1 step) works
    core.handle(b"f", [3, "steps", a, -1, 1, np.ones(2).tobytes()])
    core.handle(b"f", [4, "steps", b, -1, 2, np.ones(4).tobytes()])
    core.handle(b"f", [5, "steps", b, -1, 1, np.ones(2).tobytes()])  # queued behind the failing one
    core.step()
    got = answers(core)
    assert got[3][0] == 0 and got[3][1][:3] == [0, 0, 1]  # the other call of the batch is committed
    assert got[4][0] == 410 and got[4][1][0] == "session_lost" and got[4][1][2] == "session_id"
    core.step()
    assert answers(core)[5][:2] == [410, got[4][1]]  # what was queued behind it is told too, not applied
    core.handle(b"f", [6, "get", b])
    core.handle(b"f", [7, "steps", b, 2, 1, np.ones(2).tobytes()])
    got = answers(core)
    assert got[6][1][0] == got[7][1][0] == "session_lost"  # not 404, not session_closed
    assert core.sessions.count("fake") == 1  # its slot is free again
    be.fail_L = None
    core.handle(b"f", [8, "steps", a, -1, 1, np.ones(2).tobytes()])
    core.step()
    assert answers(core)[8][1][:3] == [1, 0, 2]
    be.fail = True  # a failed classify touches no session: a plain 500
    core.handle(b"f", [9, "classify", "fake", 1, np.ones(2).tobytes()])
    core.step()
    assert answers(core)[9][:2] == [500, ["internal", "internal error: RuntimeError", None, None]]


def test_split_levels_only_where_they_save_calls() -> None:
    assert split_levels(dict.fromkeys([1, 2, 3])) == [2, 1]
    assert split_levels(dict.fromkeys(range(1, 17))) == [16, 8, 4, 2, 1]
    assert split_levels(dict.fromkeys([5, 6, 7, 9, 12])) == [8, 4, 2, 1]
    for same_or_more in ([3], [15, 16], [1, 2, 4], [3, 5, 6]):
        assert split_levels(dict.fromkeys(same_or_more)) is None, same_or_more


def open_sessions(core: EngineCore, n: int, model: str = "fake") -> list[str]:
    for rid in range(1, n + 1):
        core.handle(b"f", [rid, "open", model, False])
    opened = answers(core)
    return [opened[rid][1]["session_id"] for rid in range(1, n + 1)]


def test_requests_of_many_lengths_in_one_batch_run_in_power_of_two_pieces_in_order() -> None:
    clock, be = Clock(), FakeBackend(8)
    core = EngineCore([be], Settings(max_batch_size=8, max_wait_ms=0, warmup=False), clock=clock)
    sids = open_sessions(core, 7)
    xs = [np.arange(2 * L, dtype=np.float64).reshape(L, 2) - L + 0.5 * i for i, L in enumerate(range(1, 8))]
    for i, (sid, x) in enumerate(zip(sids, xs, strict=True)):
        core.handle(b"f", [100 + i, "steps", sid, -1, len(x), x.tobytes()])
    core.step()
    slots = [core.sessions.get(sid).slot for sid in sids]
    # lengths 1..7 (bits 4, 2, 1): three calls, not seven; a session in every call its length has a bit of
    assert be.calls == [(4, [slots[L - 1] for L in (4, 5, 6, 7)]), (2, [slots[L - 1] for L in (2, 3, 6, 7)]),
                        (1, [slots[L - 1] for L in (1, 3, 5, 7)])]
    got = answers(core)
    for i, x in enumerate(xs):  # the fake's scores are running sums: any step out of order would show
        status, (start, replayed, seen, spikes, scores) = got[100 + i]
        L = len(x)
        assert (status, start, replayed, seen) == (0, 0, 0, L)
        assert np.frombuffer(scores).reshape(L, 2).tolist() == np.cumsum(x, 0).tolist()
        assert bits(spikes, L) == (x > 0).astype(int).tolist()


def test_a_failed_piece_loses_the_sessions_in_it_and_the_rest_of_the_batch_is_answered() -> None:
    clock, be = Clock(), FakeBackend(8)
    core = EngineCore([be], Settings(max_batch_size=8, max_wait_ms=0, warmup=False), clock=clock)
    one, two, three = open_sessions(core, 3)
    be.fail_L = 2  # the 2-step piece: the whole of `two`, and `three`'s first two steps
    for rid, (sid, L) in enumerate(((one, 1), (two, 2), (three, 3)), start=10):
        core.handle(b"f", [rid, "steps", sid, -1, L, np.ones(2 * L).tobytes()])
    core.step()
    got = answers(core)
    assert got[10][0] == 0 and got[10][1][:3] == [0, 0, 1]
    assert got[11][1][0] == got[12][1][0] == "session_lost"
    assert be.calls == [(1, [core.sessions.get(one).slot])]  # `three`'s last step did not run on a lost slot


@pytest.mark.parametrize("neuron,plan", [("sliding", "split"), ("sliding", "ragged"), ("masked", "split")])
def test_split_and_ragged_batches_give_the_bits_of_each_session_run_alone(neuron: str, plan: str) -> None:
    """Requests of many lengths in one batch, run in power-of-two pieces or in one call padded to the
    longest (a sliding-PSN net, where the calls saved outweigh the padding), give each session the bits
    of its steps run alone."""
    torch.manual_seed(0)
    cfg = NetConfig(input_shape=(3,), num_classes=4, layers=(LayerConfig("linear", 24), LayerConfig("linear", 24)),
                    neuron=neuron, k=3, T=32 if neuron == "masked" else None)
    net = PSNNet(cfg).eval()
    settings = Settings(max_batch_size=16, max_wait_ms=0, warmup=False, max_sessions=16)

    def core() -> EngineCore:
        return EngineCore([TorchBackend(LoadedModel(name="m", path=Path("."), net=net, config={}), 16)], settings,
                          clock=Clock())

    rng = np.random.default_rng(0)
    lengths = [1, 2, 3, 5, 6, 7, 9, 13]
    xs = [rng.normal(size=(2 * L, 3)).astype(np.float32) for L in lengths]  # two requests each
    batched = core()
    runner = batched.runners["m"]
    assert runner.ragged == (neuron == "sliding")
    runner.call_rows = 1e9 if plan == "ragged" else 0.0  # a call's fixed cost: worth any padding, or none
    ragged_calls = []
    run_ragged = runner.run_ragged
    runner.run_ragged = lambda *a: ragged_calls.append(a[2]) or run_ragged(*a)  # type: ignore[method-assign]
    sids = open_sessions(batched, len(lengths), "m")
    got: dict[int, list] = {}
    for half in (0, 1):
        for i, (sid, x) in enumerate(zip(sids, xs, strict=True)):
            L = len(x) // 2
            batched.handle(b"f", [1000 * half + i, "steps", sid, -1, L, x[half * L:(half + 1) * L].tobytes()])
        batched.step()
        got.update(answers(batched))
    assert ragged_calls == ([lengths, lengths] if plan == "ragged" else [])
    for i, x in enumerate(xs):  # the same steps of one session alone, in one call each
        alone = core()
        (sid,) = open_sessions(alone, 1, "m")
        alone.handle(b"f", [7, "steps", sid, -1, len(x), x.tobytes()])
        alone.step()
        _, (_, _, _, spikes, scores) = answers(alone)[7]
        L = len(x) // 2
        assert got[i][1][3] + got[1000 + i][1][3] == spikes, f"spikes of the session of {L}-step requests"
        assert got[i][1][4] + got[1000 + i][1][4] == scores, f"scores of the session of {L}-step requests"


def test_one_sessions_queue_is_bounded() -> None:
    core, be, clock = make_core(max_wait_ms=1000, session_queue=2)
    for rid in (1, 2):
        core.handle(b"f", [rid, "open", "fake", False])
    opened = answers(core)
    a, b = (opened[i][1]["session_id"] for i in (1, 2))
    x = np.ones(2).tobytes()
    for rid in (3, 4, 5):
        core.handle(b"f", [rid, "steps", a, -1, 1, x])
    core.handle(b"f", [6, "close", a])
    core.handle(b"f", [7, "steps", b, -1, 1, x])  # another session is not affected
    got = answers(core)
    assert sorted(got) == [5, 6]
    assert got[5][0] == 429 and got[5][1] == ["session_queue_full", got[5][1][1], "session_id", 1]
    assert "2 requests" in got[5][1][1] and got[6][1][0] == "session_queue_full"
    clock.now += 2
    core.step()  # a's first request runs: room for one more
    assert sorted(answers(core)) == [3, 7]
    core.handle(b"f", [8, "steps", a, -1, 1, x])
    assert answers(core) == {}


def test_a_request_past_its_deadline_is_refused_not_applied() -> None:
    core, be, clock = make_core(max_wait_ms=0, request_timeout_s=5, max_batch_size=1)
    core.handle(b"f", [1, "open", "fake", False])
    a = answers(core)[1][1]["session_id"]
    core.handle(b"f", [2, "steps", a, -1, 1, np.ones(2).tobytes()])  # deadline 1005
    core.handle(b"f", [4, "classify", "fake", 1, np.ones(2).tobytes()])  # deadline 1005
    clock.now += 3
    core.handle(b"f", [3, "steps", a, -1, 1, np.full(2, 2.0).tobytes()])  # deadline 1008
    clock.now += 3  # 1006: request 2 and the classify are past their deadline, request 3 is not
    core.step()
    got = answers(core)
    assert got[2][0] == 504 and got[2][1][0] == "request_timeout" and got[2][1][3] == 1
    assert "6 s" in got[2][1][1] and "not applied" in got[2][1][1]
    assert got[4][0] == 504 and got[4][1][0] == "request_timeout"
    assert be.calls == []
    core.step()
    start, replayed, seen, spikes, scores = answers(core)[3][1]
    assert (start, seen) == (0, 1) and np.frombuffer(scores).tolist() == [2.0, 2.0]  # only request 3 applied


def test_every_request_counts_as_use_even_a_pure_retry() -> None:
    core, be, clock = make_core(max_wait_ms=0)
    core.handle(b"f", [1, "open", "fake", False])
    a = answers(core)[1][1]["session_id"]
    core.handle(b"f", [2, "steps", a, -1, 1, np.ones(2).tobytes()])
    core.step()
    clock.now += 9  # idle 9 of 10 s
    core.handle(b"f", [3, "steps", a, 0, 1, np.ones(2).tobytes()])  # answered from the window, nothing new
    core.step()
    assert answers(core)[3][1][:2] == [0, 1] and len(be.calls) == 1
    clock.now += 9  # 18 s after the last new step, 9 s after the retry
    assert core.reap() == []
    clock.now += 2
    assert [s.id for s in core.reap()] == [a]


def test_engine_core_refuses_payloads_that_do_not_hold_L_steps() -> None:
    """The engine core does not trust a front end's sizes: a short payload or L = 0 is refused, not applied."""
    core, be, clock = make_core(max_wait_ms=0)
    core.handle(b"f", [1, "open", "fake", False])
    a = answers(core)[1][1]["session_id"]
    core.handle(b"f", [2, "steps", a, -1, 2, np.ones(3).tobytes()])  # 2 steps of 2 floats need 4
    core.handle(b"f", [3, "steps", a, -1, 0, b""])
    core.handle(b"f", [4, "classify", "fake", 1, np.ones(3).tobytes()])
    got = answers(core)
    for rid in (2, 3, 4):
        assert got[rid][0] == 422 and got[rid][1][0] == "invalid_input" and got[rid][1][2] == "steps", got[rid]
    core.step()
    assert be.calls == [] and core.handle(b"f", [5, "get", a]) is None and answers(core)[5][1]["steps_seen"] == 0


def test_ids_of_another_run_answer_session_lost_and_mistyped_ids_404() -> None:
    """Generated ids carry their issuer's tag and a check: an id issued before a restart that this run
    does not know is 410 session_lost; a mistyped or made-up one stays 404."""
    before = SessionTable(10, 100, Clock())
    before.add_model("m", 2)
    sid = before.open("m").id
    after = SessionTable(10, 100, Clock())  # a new run, a new tag (no session store)
    assert after.tag != before.tag
    err = after.gone_error(sid)
    assert err.status == 410 and err.code == "session_lost"
    mistyped = sid[:6] + ("x" if sid[6] != "x" else "y") + sid[7:]
    assert isinstance(after.gone_error(mistyped), SessionNotFound)
    assert isinstance(after.gone_error("made-up"), SessionNotFound)
    same_store = SessionTable(10, 100, Clock(), tag=before.tag)  # a restart that kept its store's tag
    assert isinstance(same_store.gone_error(sid), SessionNotFound)  # its log would have had it: never issued


# ----- owners: sessions and limits per API key ------------------------------------------------------
def not_found_as(got: list, sid: str, nothing: list, missing: str) -> bool:
    """``got`` is the answer a never-seen id gets (``nothing``, for ``missing``), but for the id it names."""
    return got[0] == nothing[0] == 404 and got[1] == [nothing[1][0], nothing[1][1].replace(missing, sid),
                                                       *nothing[1][2:]]


def test_a_session_is_visible_to_its_owner_only_live_or_gone() -> None:
    core, be, clock = make_core(max_wait_ms=0)
    core.handle(b"f", [1, "open", "fake", False, None, "alice"])
    a = answers(core)[1][1]["session_id"]
    x = np.ones(2).tobytes()
    for rid, req in ((2, ["get", a, True, "bob"]), (3, ["steps", a, -1, 1, x, "bob"]), (4, ["close", a, "bob"]),
                     (5, ["get", a, False]), (6, ["steps", a, 0, 1, x]), (9, ["get", "missing", False, "bob"])):
        core.handle(b"f", [rid, *req])
    got = answers(core)
    nothing = got[9]
    for rid in (2, 3, 4, 5, 6):  # another owner (or none) is told what an id that never existed is told
        assert not_found_as(got[rid], a, nothing, "missing"), got[rid]
    core.step()
    assert be.calls == [] and core.sessions.live[a].watchers == set()  # nothing applied, nothing watched
    core.handle(b"f", [10, "steps", a, -1, 1, x, "alice"])
    core.step()
    assert answers(core)[10][1][:3] == [0, 0, 1]
    core.handle(b"f", [11, "close", a, "alice"])
    core.handle(b"f", [12, "get", a, False, "alice"])
    core.handle(b"f", [13, "get", a, False, "bob"])
    got = answers(core)
    assert got[12][:2] == [410, got[12][1]] and got[12][1][0] == "session_closed"  # its owner learns it was closed
    assert not_found_as(got[13], a, nothing, "missing")  # no one else does
    # an OIP sequence id is taken by its owner's session: another owner cannot restart (and so close) it
    core.handle(b"f", [14, "open", "fake", False, "oip:alice:fake:7", "alice"])
    core.handle(b"f", [15, "open", "fake", False, "oip:alice:fake:7", "bob"])
    got = answers(core)
    assert got[14][0] == 0 and got[15][0] == 422 and "oip:alice:fake:7" in core.sessions.live


def test_live_sessions_are_counted_per_owner() -> None:
    core, be, clock = make_core(key_max_sessions=2, idle_timeout_s=10)
    for rid in (1, 2, 3):
        core.handle(b"f", [rid, "open", "fake", False, None, "alice"])
    core.handle(b"f", [4, "open", "fake", False, None, "bob"])
    core.handle(b"f", [5, "open", "fake", False, None])  # no owner (access control off): no per-key limit
    got = answers(core)
    assert [got[r][0] for r in (1, 2, 4, 5)] == [0, 0, 0, 0] and got[3][0] == 429
    code, message, field, retry_after = got[3][1]
    assert code == "too_many_key_sessions" and "PSN_KEY_MAX_SESSIONS=2" in message and retry_after == 10
    assert core.sessions.owned == {"alice": 2, "bob": 1, "": 1}
    core.handle(b"f", [6, "close", got[1][1]["session_id"], "alice"])
    core.handle(b"f", [7, "open", "fake", False, None, "alice"])  # room again
    core.handle(b"f", [8, "open", "fake", False, None, "alice"])
    got = answers(core)
    assert got[7][0] == 0 and got[8][1][0] == "too_many_key_sessions"
    clock.now += 5
    core.handle(b"f", [9, "steps", got[7][1]["session_id"], -1, 1, np.ones(2).tobytes(), "alice"])  # used now
    clock.now += 1
    core.step()
    clock.now += 5  # the others have been idle 11 s, this one 6 s
    assert len(core.reap()) == 3 and core.sessions.owned == {"alice": 1}  # expiry frees their places
    core.handle(b"f", [10, "open", "fake", False, "oip:alice:fake:7", "alice"])
    core.handle(b"f", [11, "open", "fake", False, "oip:alice:fake:7", "alice"])  # a restart replaces, at the limit
    core.handle(b"f", [12, "open", "fake", False, None, "alice"])
    got = answers(core)
    assert got[10][0] == got[11][0] == 0 and got[12][1][0] == "too_many_key_sessions"
    assert core.sessions.owned == {"alice": 2}


def test_a_sequence_start_whose_steps_would_be_refused_leaves_the_sequence_as_it_was() -> None:
    """OIP sends sequence_start as an open (a live sequence starts over) and then the steps: the open
    carries the step count and is refused first, so a 429/503 does not reset the sequence."""
    core, be, clock = make_core(key_steps_per_s=2, max_steps_per_request=4, queue_depth=1, max_wait_ms=0)
    sid = "oip:alice:fake:7"
    core.handle(b"f", [1, "open", "fake", False, sid, "alice", 4])
    core.handle(b"f", [2, "steps", sid, -1, 4, np.ones(8).tobytes(), "alice"])  # the whole burst
    core.step()
    assert answers(core)[2][1][:3] == [0, 0, 4]
    core.handle(b"f", [3, "open", "fake", False, sid, "alice", 4])  # 4 steps fit in 1 s: refused
    core.handle(b"f", [4, "get", sid, False, "alice"])
    got = answers(core)
    assert got[3][0] == 429 and got[3][1][0] == "rate_limited" and got[4][1]["steps_seen"] == 4
    core.handle(b"f", [5, "open", "fake", False, "oip::fake:8"])  # another sequence (no key) fills the queue
    core.handle(b"f", [6, "steps", "oip::fake:8", -1, 1, np.ones(2).tobytes()])
    core.handle(b"f", [7, "open", "fake", False, "oip::fake:8", "", 1])
    core.handle(b"f", [8, "get", "oip::fake:8", False])
    got = answers(core)
    assert got[7][0] == 503 and got[7][1][0] == "queue_full" and 6 not in got and got[8][1]["steps_seen"] == 0
    clock.now += 2
    core.step()
    assert answers(core)[6][1][:3] == [0, 0, 1]  # the queued request ran on the sequence it was sent to
    core.handle(b"f", [9, "open", "fake", False, sid, "alice", 4])  # refilled: the start goes through
    assert answers(core)[9][1]["steps_seen"] == 0


def test_steps_per_second_is_a_token_bucket_per_owner() -> None:
    core, be, clock = make_core(key_steps_per_s=2, max_steps_per_request=4, session_queue=1, max_wait_ms=1000)
    for rid, owner in ((1, "alice"), (2, "alice"), (3, "bob"), (4, None)):
        core.handle(b"f", [rid, "open", "fake", False, None, *([owner] if owner else [])])
    opened = answers(core)
    a1, a2, b, anon = (opened[r][1]["session_id"] for r in (1, 2, 3, 4))

    def steps(rid: int, sid: str, L: int, owner: str | None = "alice") -> None:
        core.handle(b"f", [rid, "steps", sid, -1, L, np.ones(2 * L).tobytes(), *([owner] if owner else [])])

    steps(5, a1, 2)  # a burst of max(2 steps/s, 4 steps per request) = 4
    steps(6, a1, 2)  # refused by its session's queue (PSN_SESSION_QUEUE=1): not counted
    steps(7, a2, 2)
    steps(8, a2, 1)  # the bucket is empty
    core.handle(b"f", [9, "classify", "fake", 1, np.ones(2).tobytes(), "alice"])  # classify counts too
    steps(10, b, 4, "bob")  # bob has his own bucket
    steps(11, anon, 4, None)  # no owner: no limit
    got = answers(core)
    assert sorted(got) == [6, 8, 9] and got[6][1][0] == "session_queue_full"
    for rid in (8, 9):
        code, message, field, retry_after = got[rid][1]
        assert got[rid][0] == 429 and code == "rate_limited" and retry_after == 1 and "PSN_KEY_STEPS_PER_S" in message
    clock.now += 2  # the batch runs; 4 steps' worth refill, no more (the bucket holds 4)
    core.step()
    answers(core)
    clock.now += 100
    steps(12, a1, 4)
    steps(13, a2, 1)
    got = answers(core)
    assert sorted(got) == [13] and got[13][1][0] == "rate_limited"
    assert got[13][1][3] == 1  # 1 step at 2 per second: 0.5 s, a Retry-After of 1
    clock.now += 0.5
    steps(14, a2, 1)
    assert answers(core) == {}  # queued: admitted






# ----- contracts found by a mutation sweep (2026-12-07): each test fails for a one-line change of the code





def masked_core(T: int = 4, **settings):
    clock, be = Clock(), FakeBackend(4)
    cfg = NetConfig(input_shape=(2,), num_classes=2, layers=(LayerConfig("linear", 2),), neuron="masked", k=2, T=T)
    be.model = LoadedModel(name="fake", path=Path("."), net=PSNNet(cfg), config={})
    core = EngineCore([be], Settings(**{"max_batch_size": 8, "max_wait_ms": 0, "retry_window": 3, "warmup": False,
                                        "idle_timeout_s": 10, **settings}), clock=clock)
    return core, be, clock


def test_an_overdue_batch_waits_zero_not_a_negative_time() -> None:
    sched = Scheduler(max_batch_size=3, max_wait_s=0.01)
    sched.add(req(Session("a", "m", 0, 0.0), 1.0))
    assert sched.wait_s(2.0) == 0.0


def test_without_access_control_the_per_key_session_limit_does_not_apply() -> None:
    core, be, clock = make_core(key_max_sessions=1)
    for rid in (1, 2, 3):
        core.handle(b"f", [rid, "open", "fake", False])
    assert [a[0] for a in answers(core).values()] == [0, 0, 0]


def test_without_access_control_the_per_key_step_rate_does_not_apply() -> None:
    core, be, clock = make_core(key_steps_per_s=2, max_steps_per_request=4, max_wait_ms=0)
    (a,) = open_sessions(core, 1)
    core.handle(b"f", [2, "steps", a, -1, 5, np.ones(10).tobytes()])  # more than a key's burst
    core.step()
    assert answers(core)[2][0] == 0 and "" not in core.quotas.buckets


def test_an_id_of_another_length_is_not_taken_for_one_issued_here() -> None:
    body = "abcd" + "x" * 6
    assert id_tag(body + _check(body)) is None
    t = SessionTable(10, 10, Clock())
    assert isinstance(t.gone_error(body + _check(body)), SessionNotFound)


def test_an_id_opened_again_forgets_its_old_owner() -> None:
    t = SessionTable(10, 10, Clock())
    t.add_model("m", 2)
    t.close(t.open("m", "x", owner="k"))
    t.close(t.open("m", "x"))
    assert t.gone() == [("x", "session_closed", "")]


def test_closing_a_session_twice_changes_nothing_the_second_time() -> None:
    t = SessionTable(10, 10, Clock())
    t.add_model("m", 2)
    s = t.open("m", owner="k")
    t.close(s)
    t.close(s, "session_expired")
    assert t.count("m") == 0 and t.owned == {} and t.gone() == [(s.id, "session_closed", "k")]


def test_a_session_moved_to_another_replica_is_not_remembered_as_gone() -> None:
    t = SessionTable(10, 10, Clock())
    t.add_model("m", 2)
    s = t.open("m")
    t.close(s, "session_moved")
    assert t.gone() == [] and isinstance(t.gone_error(s.id), SessionNotFound)


def test_a_session_idle_exactly_the_timeout_is_not_yet_expired() -> None:
    clock = Clock()
    t = SessionTable(10, 10, clock)
    t.add_model("m", 2)
    s = t.open("m")
    clock.now += 10
    assert t.expire_idle() == []
    clock.now += 0.5
    assert t.expire_idle() == [s]


def test_an_id_remembered_again_becomes_the_newest_gone() -> None:
    t = SessionTable(10, 2, Clock())
    t.remember("a", "session_closed")
    t.remember("b", "session_closed")
    t.remember("a", "session_lost")
    t.remember("c", "session_closed")  # evicts the oldest: b
    assert [g[0] for g in t.gone()] == ["a", "c"]


def test_one_key_cycling_sessions_does_not_push_out_another_keys_ended_ids() -> None:
    """Past PSN_REMEMBER_GONE, a key that opens and closes sessions in a loop forgets its own ended ids
    first: another key's stay answered 410 (down to an equal share of the limit), not 404."""
    t = SessionTable(10, 6, Clock())
    t.add_model("m", 2)
    b = [t.open("m", owner="b") for _ in range(2)]
    for s in b:
        t.close(s)
    a = []
    for _ in range(50):
        a.append(t.open("m", owner="a"))
        t.close(a[-1])
    for s in b:
        assert t.gone_error(s.id, owner="b").code == "session_closed"
    assert [g[0] for g in t.gone()] == [s.id for s in b] + [s.id for s in a[-4:]]
    assert isinstance(t.gone_error(a[-5].id, owner="a"), SessionNotFound)
    # a key holding more than its share loses its oldest down to an equal share, oldest first
    c = t.open("m", owner="c")
    t.close(c)  # 3 owners, 7 ids: a (4 of them) is over the average and gives up its oldest
    assert [g[0] for g in t.gone()] == [s.id for s in b] + [s.id for s in a[-3:]] + [c.id]
    cs = [c]
    for _ in range(3):
        cs.append(t.open("m", owner="c"))
        t.close(cs[-1])  # first c at 2 is not over the average: a, holding the most, pays; then c pays
    assert [g[0] for g in t.gone()] == [s.id for s in b] + [s.id for s in a[-2:]] + [s.id for s in cs[-2:]]


def test_without_owners_the_oldest_ended_id_is_forgotten_first() -> None:
    t = SessionTable(10, 3, Clock())
    t.add_model("m", 2)
    ids = []
    for _ in range(5):
        s = t.open("m")
        ids.append(s.id)
        t.close(s)
    assert [g[0] for g in t.gone()] == ids[2:]


def remembered(limit: int, ended: list[tuple[str, str]], reopened: tuple[str, str] | None = None) -> list[str]:
    """The ids a table of ``limit`` remembers after ``ended`` (id, owner) were remembered in order; ``reopened``:
    (id, owner), an ended id opened again (an OIP sequence id) after the first of ``ended``."""
    t = SessionTable(10, limit, Clock())
    t.add_model("m", 2)
    for i, (sid, owner) in enumerate(ended):
        t.remember(sid, "session_closed", owner)
        if reopened is not None and i == 0:
            t.open("m", sid=reopened[0], owner=reopened[1])
    return [g[0] for g in t.gone()]


def test_past_the_limit_the_owner_over_its_share_pays_else_the_one_holding_the_most() -> None:
    """The rule docs and ``SessionTable.remember`` give, at each boundary: the remembering owner gives up its
    oldest id only when it holds more than the average owner, else the owner holding the most does; an owner
    whose ids are all forgotten no longer counts in the average."""
    # b's 2nd id: 4 owners, 7 ids, b holds 2 > 7/4: b pays, though a holds the most
    assert remembered(6, [("a1", "a"), ("a2", "a"), ("a3", "a"), ("b1", "b"), ("c1", "c"), ("d1", "d"),
                          ("b2", "b")]) == ["a1", "a2", "a3", "c1", "d1", "b2"]
    # b's 2nd id: 3 owners, 6 ids, b holds exactly the average (2): not over it, so a (3) pays
    assert remembered(5, [("a1", "a"), ("a2", "a"), ("a3", "a"), ("c1", "c"), ("b1", "b"),
                          ("b2", "b")]) == ["a2", "a3", "c1", "b1", "b2"]
    # c's only id opened again: 2 owners left, a's 2nd id is not over 5/2, so b (3) pays
    assert remembered(4, [("c1", "c"), ("a1", "a"), ("b1", "b"), ("b2", "b"), ("b3", "b"), ("a2", "a")],
                      reopened=("c1", "c")) == ["a1", "b2", "b3", "a2"]


def test_a_model_with_a_horizon_takes_exactly_T_steps_everywhere() -> None:
    core, be, clock = masked_core(T=4)
    core.handle(b"f", [1, "open", "fake", False, "oip::fake:1", "", 4])  # a sequence start of T steps
    assert answers(core)[1][0] == 0
    core.handle(b"f", [2, "steps", "oip::fake:1", -1, 4, np.ones(8).tobytes()])
    core.handle(b"f", [3, "classify", "fake", 4, np.ones(8).tobytes()])
    core.step()
    got = answers(core)
    assert got[2][0] == 0 and got[2][1][:3] == [0, 0, 4] and got[3][0] == 0


def test_a_request_exactly_at_its_deadline_still_runs() -> None:
    core, be, clock = make_core(max_wait_ms=0, request_timeout_s=5)
    (a,) = open_sessions(core, 1)
    core.handle(b"f", [2, "steps", a, -1, 1, np.ones(2).tobytes()])
    core.handle(b"f", [3, "classify", "fake", 1, np.ones(2).tobytes()])
    clock.now += 5
    core.step()
    got = answers(core)
    assert got[2][0] == 0 and got[3][0] == 0


def test_idle_time_counts_from_when_the_steps_ran_not_when_they_arrived() -> None:
    core, be, clock = make_core(max_wait_ms=5000, idle_timeout_s=10)
    (a,) = open_sessions(core, 1)
    core.handle(b"f", [2, "steps", a, -1, 1, np.ones(2).tobytes()])  # at 1000
    clock.now += 5
    core.step()  # runs at 1005
    clock.now += 9  # 14 s after the request arrived, 9 s after it ran
    assert core.reap() == []


def test_a_clients_close_behind_steps_runs_in_its_own_turn() -> None:
    core, be, clock = make_core(max_wait_ms=1000)
    (a,) = open_sessions(core, 1)
    core.handle(b"f", [2, "steps", a, -1, 1, np.ones(2).tobytes()])
    core.handle(b"f", [3, "close", a])
    clock.now += 2
    core.step()
    assert sorted(answers(core)) == [2] and a in core.sessions.live
    clock.now += 2
    core.step()
    assert sorted(answers(core)) == [3]


def test_a_sequence_end_on_a_session_lost_in_its_batch_is_answered_once() -> None:
    core, be, clock = make_core(max_wait_ms=0)
    be.fail = True
    core.handle(b"f", [1, "sequence", "oip::fake:1", "fake", True, True, 1, np.ones(2).tobytes()])
    core.step()
    out = core.take_outbox()[b"f"]
    assert [item[0] for item in out] == [1] and out[0][2][0] == "session_lost"


def test_a_sequence_end_takes_one_place_in_its_session_queue() -> None:
    """The close a sequence_end queues behind its steps is part of that request: under PSN_SESSION_QUEUE=1 a
    sequence can still end, and a start+end request (a whole sequence in one) runs, on a fresh session."""
    core, be, clock = make_core(max_wait_ms=0, session_queue=1)
    sid = "oip::fake:1"
    core.handle(b"f", [1, "sequence", sid, "fake", True, False, 1, np.ones(2).tobytes()])
    core.step()
    core.handle(b"f", [2, "sequence", sid, "fake", False, True, 1, np.ones(2).tobytes()])  # empty queue: room for it
    core.step()
    got = answers(core)
    assert got[2][0] == 0 and got[2][1][:3] == [1, 0, 2] and sid not in core.sessions.live
    core.handle(b"f", [3, "sequence", sid, "fake", True, True, 2, np.ones(4).tobytes()])
    core.step()
    got = answers(core)
    assert got[3][0] == 0 and got[3][1][:3] == [0, 0, 2] and sid not in core.sessions.live


def test_expires_in_is_never_negative() -> None:
    core, be, clock = make_core()
    (a,) = open_sessions(core, 1)
    clock.now += 15  # past the idle timeout, not reaped yet
    core.handle(b"f", [2, "get", a])
    assert answers(core)[2][1]["expires_in_s"] == 0.0


def test_a_draining_engine_does_not_wait_for_fuller_batches() -> None:
    core, be, clock = make_core(max_wait_ms=1000)
    (a,) = open_sessions(core, 1)
    core.handle(b"f", [2, "steps", a, -1, 1, np.ones(2).tobytes()])
    core.begin_drain()
    assert core.wait_s() == 0.0


def test_a_session_with_a_gap_in_the_log_is_lost_alone(tmp_path) -> None:
    clock, be = Clock(), FakeBackend(4)
    settings = Settings(max_batch_size=8, max_wait_ms=0, retry_window=3, warmup=False, idle_timeout_s=10)
    store = FileStore(tmp_path)
    core = EngineCore([be], settings, clock=clock, store=store)
    spec = core.specs["fake"]
    row = spec.row

    def steps(t0: int, L: int) -> bytes:
        return b"".join(frame_parts([STEPS, "fake", L, ["g"], np.array([t0], np.int64).tobytes()],
                                    np.zeros((1, L, row), np.uint8), np.zeros((1, L, spec.spike_bytes), np.uint8),
                                    np.zeros((1, L, spec.classes * spec.wire.itemsize), np.uint8),
                                    np.zeros((1, spec.classes * spec.sums.itemsize), np.uint8)))
    store.append([core.log.header("tagx"), frame([OPEN, "fake", "g", ""]), steps(0, 1), steps(5, 1)])  # a gap
    stats = core.recover()
    assert stats.get("failed") is None and stats["lost"] == 1
    core.handle(b"f", [1, "get", "g"])
    assert answers(core)[1][1][0] == "session_lost"


def test_refused_classify_requests_leave_the_queue() -> None:
    core, be, clock = make_core(max_wait_ms=1000)
    core.handle(b"f", [1, "classify", "fake", 1, np.ones(2).tobytes()])
    core.refuse_pending()
    assert answers(core)[1][1][0] == "shutting_down"
    assert not core.has_work() and core.step() is False and answers(core) == {}


def test_a_front_end_that_attached_with_watch_is_told_of_expiry() -> None:
    core, be, clock = make_core()
    (a,) = open_sessions(core, 1)
    core.handle(b"g", [2, "get", a, True])
    core.take_outbox()
    clock.now += 11
    core.reap()
    assert core.take_outbox() == {b"g": [[0, "expired", a]]}


def test_a_ragged_call_is_chosen_only_where_the_calls_it_saves_outweigh_its_padding() -> None:
    runner = SimpleNamespace(ragged=True, call_rows=100.0)
    items = [object()]
    assert EngineCore._ragged_pays(runner, {16: items * 10, 1: items}, 2)  # 15 padding rows < 100
    assert not EngineCore._ragged_pays(runner, {16: items, 1: items * 50}, 2)  # 750 padding rows > 1 x 100
    assert not EngineCore._ragged_pays(runner, {16: items, 1: items * 50}, 8)  # 750 > 7 calls saved x 100
    assert EngineCore._ragged_pays(runner, {16: items, 1: items * 50}, 9)  # 750 < 8 x 100
    assert not EngineCore._ragged_pays(runner, {16: items}, 1)  # one call either way
    runner.ragged = False  # the backend cannot (a masked or LIF net, ONNX)
    assert not EngineCore._ragged_pays(runner, {16: items * 10, 1: items}, 2)


def sliding_core(store: FileStore | None = None, clock: Clock | None = None, **settings) -> EngineCore:
    torch.manual_seed(0)
    cfg = NetConfig(input_shape=(3,), num_classes=4, layers=(LayerConfig("linear", 24),), neuron="sliding", k=3)
    net = PSNNet(cfg).eval()
    return EngineCore([TorchBackend(LoadedModel(name="m", path=Path("."), net=net, config={}), 16)],
                      Settings(max_batch_size=16, max_wait_ms=0, warmup=False, max_sessions=16, **settings),
                      clock=clock or Clock(), store=store)


def test_a_failed_ragged_call_loses_its_sessions_and_the_loop_keeps_serving() -> None:
    core = sliding_core()
    runner = core.runners["m"]
    runner.call_rows = 1e9
    a, b, c = open_sessions(core, 3, "m")
    run_ragged = runner.run_ragged

    def fail(*args):
        raise RuntimeError("device lost")

    runner.run_ragged = fail  # type: ignore[method-assign]
    for rid, (sid, L) in enumerate(((a, 1), (b, 2)), start=10):
        core.handle(b"f", [rid, "steps", sid, -1, L, np.ones(3 * L, np.float32).tobytes()])
    core.step()
    got = answers(core)
    assert got[10][1][0] == got[11][1][0] == "session_lost"
    runner.run_ragged = run_ragged  # type: ignore[method-assign]
    for rid, (sid, L) in enumerate(((c, 1), (c, 3)), start=20):
        core.handle(b"f", [rid, "steps", sid, -1, L, np.ones(3 * L, np.float32).tobytes()])
        core.step()
    got = answers(core)
    assert got[20][1][:3] == [0, 0, 1] and got[21][1][:3] == [1, 0, 4]


def test_the_warm_up_measures_a_calls_cost_and_leaves_the_slots_empty() -> None:
    core = sliding_core()
    runner = core.runners["m"]
    before = runner.backend.score_sums(torch.arange(16)).clone()
    runner.call_rows = -1.0
    runner.measure_call_rows()
    assert 8.0 <= runner.call_rows <= 4096.0
    assert torch.equal(runner.backend.score_sums(torch.arange(16)), before)
    st = runner.backend._slots()
    assert all(int(ns.window.abs().sum()) == 0 and int(ns.t.sum()) == 0 for ns in st.neurons)
    assert int(st.t.sum()) == 0


def real_core(neuron: str, T: int | None, max_slots: int = 4, k: int = 3) -> EngineCore:
    torch.manual_seed(1)
    cfg = NetConfig(input_shape=(3,), num_classes=4, layers=(LayerConfig("linear", 8),), neuron=neuron, k=k, T=T)
    net = PSNNet(cfg).double().eval()
    return EngineCore([TorchBackend(LoadedModel(name="m", path=Path("."), net=net, config={}), max_slots)],
                      Settings(max_batch_size=8, max_wait_ms=0, warmup=False, max_sessions=4), clock=Clock())


def test_steps_past_a_masked_models_horizon_are_refused_before_they_run_and_the_session_lives_on() -> None:
    core = real_core("masked", T=5)
    (a,) = open_sessions(core, 1, "m")
    x = np.random.default_rng(0).normal(size=(6, 3))
    core.handle(b"f", [10, "steps", a, -1, 3, x[:3].tobytes()])
    core.step()
    assert answers(core)[10][0] == 0
    core.handle(b"f", [11, "steps", a, -1, 3, x[3:6].tobytes()])  # steps 4..6 of a horizon of 5
    core.step()
    got = answers(core)
    assert got[11][0] == 422 and got[11][1][0] == "past_horizon", got[11]
    core.handle(b"f", [12, "steps", a, -1, 2, x[3:5].tobytes()])  # the two that fit still run
    core.step()
    got = answers(core)
    assert got[12][0] == 0 and got[12][1][:3] == [3, 0, 5], got[12]  # from step 3, none replayed, now at 5
    core.handle(b"f", [13, "classify", "m", 6, x.tobytes()])
    assert answers(core)[13][1][0] == "past_horizon"


def test_a_plain_psn_classifies_exactly_T_steps_and_refuses_others_before_they_run() -> None:
    core = real_core("psn", T=4)
    x = np.random.default_rng(1).normal(size=(5, 3))
    core.handle(b"f", [1, "classify", "m", 3, x[:3].tobytes()])
    core.handle(b"f", [2, "classify", "m", 5, x.tobytes()])
    got = answers(core)
    for rid in (1, 2):
        assert got[rid][0] == 422 and got[rid][1][0] == "invalid_input", got[rid]
    assert not core.classify_queue["m"]
    core.handle(b"f", [3, "classify", "m", 4, x[:4].tobytes()])
    core.step()
    assert answers(core)[3][0] == 0


def test_the_warm_up_leaves_slot_0_fresh_for_a_net_it_does_not_measure() -> None:
    """A masked-PSN net is not ragged, so no call-cost measurement resets the slots after the warm-up's
    calls on slot 0: the warm-up itself must, or the first session there starts from its steps."""
    core = real_core("masked", T=20)
    runner = core.runners["m"]
    core.warmup()
    st = runner.backend._slots()
    assert all(int(ns.t.abs().sum()) == 0 and float(ns.window.abs().sum()) == 0 for ns in st.neurons)
    assert int(st.t.sum()) == 0 and float(st.score_sum.abs().sum()) == 0
    (a,) = open_sessions(core, 1, "m")
    x = np.random.default_rng(2).normal(size=(4, 3))
    core.handle(b"f", [10, "steps", a, -1, 4, x.tobytes()])
    core.step()
    got = answers(core)[10][1]
    want = runner.backend.model.net(torch.from_numpy(x).unsqueeze(1))
    assert got[0] == 0
    assert np.frombuffer(got[4], np.float64).tolist() == want.scores[:, 0].reshape(-1).tolist()


def test_a_streaming_model_whose_backend_holds_no_slots_only_classifies() -> None:
    """The backend contract lets a backend hold no session slots (an ONNX folder without a step graph):
    the runner then does not stream, and its warm-up makes no streaming call."""
    core = real_core("sliding", T=None, max_slots=0)
    runner = core.runners["m"]
    assert not runner.streams and not runner.ragged and runner.info()["streams"] is False
    core.warmup()
    core.handle(b"f", [1, "open", "m", False])
    got = answers(core)[1]
    assert got[0] == 409 and got[1][0] == "model_cannot_stream", got
    assert "no session slots" in got[1][1] and "reads the whole sequence" not in got[1][1]  # the reason that holds


class StepClock:
    """A clock that a backend call moves on by a fixed cost plus a cost per session-step row."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


@pytest.mark.parametrize("fixed,per_row,want", [(1e-3, 1e-5, 100.0), (1.0, 1e-6, 4096.0), (1e-6, 1e-3, 8.0)])
def test_the_call_cost_is_measured_as_a_calls_fixed_cost_over_a_rows_cost(monkeypatch, fixed, per_row, want) -> None:
    """``call_rows`` is the number of padding rows one call's fixed cost is worth: fixed / per-row, kept in
    [8, 4096]. The real backend runs; only the clock it is timed by is one whose time each call moves on by
    ``fixed + rows * per_row``."""
    import service.core.runner as runner_module

    core = sliding_core()
    runner = core.runners["m"]
    clock = StepClock()
    monkeypatch.setattr(runner_module, "time", clock)
    backend_run = runner.backend.run

    def timed(x, slots):
        clock.now += fixed + x.shape[0] * x.shape[1] * per_row
        return backend_run(x, slots)

    monkeypatch.setattr(runner.backend, "run", timed)
    runner.measure_call_rows()
    assert runner.call_rows == pytest.approx(want, rel=1e-6)


class HungStore(FileStore):
    """A store whose writes time out (a Redis that stopped answering) until ``hung`` is False; counts the
    rewrites tried."""

    def __init__(self, directory) -> None:
        super().__init__(directory)
        self.hung, self.rewrites = False, 0

    def append(self, parts) -> None:
        if self.hung:
            raise TimeoutError("Timeout reading from the store")
        super().append(parts)

    def rewrite(self, data: bytes) -> None:
        self.rewrites += 1
        if self.hung:
            raise TimeoutError("Timeout reading from the store")
        super().rewrite(data)

    def reachable(self) -> bool:
        return not self.hung


def test_a_store_that_does_not_answer_its_probe_gets_no_rewrite_until_it_does(tmp_path) -> None:
    """After a failed write the log is rewritten from memory once the store works again, tried once a
    second; each try against a hung store would hold the engine core's loop for a whole write timeout, so
    a store whose quick probe fails gets no try at all, and the first second after it answers does."""
    clock, store = Clock(), HungStore(tmp_path)
    core = sliding_core(store, clock)
    (a,) = open_sessions(core, 1, "m")
    core.flush_log()
    store.hung = True
    core.handle(b"f", [5, "steps", a, -1, 1, np.ones(3, np.float32).tobytes()])
    core.step()
    core.flush_log()  # the write fails: the log is stale from here
    assert answers(core)[5][0] == 0  # answered: a failing store refuses nothing
    for _ in range(5):
        clock.now += 1.5
        core.flush_log()
    assert store.rewrites == 0
    store.hung = False
    core.flush_log()  # within a second of the last probe: not yet
    assert store.rewrites == 0
    clock.now += 1.5
    core.flush_log()
    assert store.rewrites == 1 and not core._log_stale
