"""The session log's parts without a server: frames, stores, reading a log back."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from service.core.journal import (
    END,
    FRAME,
    OPEN,
    STEPS,
    CorruptLog,
    FileStore,
    LogSpec,
    Recovered,
    SessionLog,
    frame,
    frame_parts,
    read_frames,
    read_log,
    snapshot_frame,
)
from tests.service.conftest import ROOT

SPEC = LogSpec(name="m", row=8, spike_bytes=1, classes=2, wire=np.dtype(np.float32), sums=np.dtype(np.float64),
               replay=3, window=2, fingerprint="f")


def steps_frame(sids: list[str], t0: list[int], L: int, seed: int,
                outputs: list | None = None) -> tuple[bytes, np.ndarray]:
    """A STEPS record of random bytes; ``outputs`` (if given) gets (spikes, scores, sums) appended."""
    rng = np.random.default_rng(seed)
    B = len(sids)
    inputs = rng.integers(0, 255, (B, L, SPEC.row), np.uint8)
    spikes = rng.integers(0, 255, (B, L, 1), np.uint8)
    scores = rng.random((B, L, 2), np.float32)
    sums = rng.random((B, 2))
    if outputs is not None:
        outputs.append((spikes, scores, sums))
    return frame([STEPS, "m", L, sids, np.array(t0, np.int64).tobytes()], inputs.data, spikes.data, scores.data,
                 sums.data), inputs


def test_frames_stop_at_a_torn_or_corrupt_record() -> None:
    a, b = frame([OPEN, "m", "s1", ""]), frame([OPEN, "m", "s2", ""])
    assert [h[2] for h, _ in read_frames(a + b)] == ["s1", "s2"]
    assert [h[2] for h, _ in read_frames(a + b[:-3])] == ["s1"]  # a crash mid-write
    bad = bytearray(b)
    bad[-1] ^= 0xFF
    for damaged in (a + bytes(bad) + a, a + bytes(bad), bytes(bad) + a, b"not a session log at all"):
        with pytest.raises(CorruptLog):  # a whole record that is bad: what it and what follows held is unknown
            list(read_frames(damaged))


def test_read_log_keeps_the_replay_tail_outputs_and_sums() -> None:
    log = frame([OPEN, "m", "a", "k1"]) + frame([OPEN, "m", "b", ""])
    chunks: list = []
    outs: list = []
    t = 0
    for i, L in enumerate([2, 1, 3, 1]):
        f, inputs = steps_frame(["b", "a"], [t, t], L, seed=i, outputs=outs)  # a second in each
        log += f
        chunks.append(inputs)
        t += L
    log += frame([END, ["b"], ["session_closed"]])
    st = read_log(log, {"m": SPEC})
    assert set(st.live) == {"a"} and st.gone == {"b": ("session_closed", "")}
    a = st.live["a"]
    assert a.t == 7 and a.owner == "k1"
    all_inputs = np.concatenate([c[1] for c in chunks])  # (7, row)
    assert a.last_inputs(3, SPEC.row) == all_inputs[-3:].tobytes()
    assert a.n_inputs >= 3 and a.n_outputs >= 2
    spikes = np.concatenate([o[0][1] for o in outs])  # session a's (7, 1) spikes, (7, 2) scores
    scores = np.concatenate([o[1][1] for o in outs])
    sp, sc = a.last_outputs(2, SPEC.spike_bytes, 2 * 4)  # a retry of the last two steps after a restart
    assert sp == spikes[-2:].tobytes() and sc == scores[-2:].tobytes()
    assert a.last_outputs(0, 1, 8) == (b"", b"")
    assert a.sums == outs[-1][2][1].tobytes()  # the score sum after the last logged step


def test_a_gap_in_a_sessions_records_makes_it_unrebuildable() -> None:
    f1, _ = steps_frame(["a"], [0], 2, seed=1)
    f2, _ = steps_frame(["a"], [3], 1, seed=2)  # steps 2 was never logged
    st = read_log(frame([OPEN, "m", "a", ""]) + f1 + f2, {"m": SPEC})
    assert st.live["a"].t == -1


def test_snapshot_then_steps_round_trip() -> None:
    inputs = np.arange(2 * 3 * 8, dtype=np.uint8).reshape(2, 3, 8)
    rng = np.random.default_rng(5)
    spikes, scores = rng.integers(0, 255, (2, 2, 1), np.uint8), rng.random((2, 2, 2), np.float32)
    sums = rng.random((2, 2))
    snap = snapshot_frame(SPEC, ["a", "b"], ["", "k"], np.array([10, 3]), 3, 2, inputs, spikes, scores, sums)
    for i, rec in enumerate(read_log(snap, {"m": SPEC}).live.values()):  # each session gets its own rows
        assert rec.last_outputs(2, 1, 8) == (spikes[i].tobytes(), scores[i].tobytes())
        assert rec.sums == sums[i].tobytes() and rec.last_inputs(3, 8) == inputs[i].tobytes()
    f, more = steps_frame(["b"], [3], 2, seed=4)
    st = read_log(snap + f, {"m": SPEC})
    assert st.live["a"].t == 10 and st.live["a"].last_inputs(3, 8) == inputs[0].tobytes()
    b = st.live["b"]
    assert b.t == 5 and b.owner == "k"
    assert b.last_inputs(3, 8) == np.concatenate([inputs[1], more[0]])[-3:].tobytes()


def load_anew(path) -> bytes:
    """The log as a new process finds it (the folder's lock is held by one store at a time)."""
    store = FileStore(path)
    try:
        return store.load()
    finally:
        store.close()


def test_file_store_generations(tmp_path) -> None:
    store = FileStore(tmp_path)
    log = SessionLog(store, {"m": SPEC}, compact_bytes=100)
    log.opened("m", "a", "")
    log.flush()
    assert not log.due
    log.opened("m", "b" * 200, "")
    log.flush()
    assert log.due  # past 100 bytes since the last rewrite
    log.rewrite([log.header("tag1"), frame([OPEN, "m", "c", ""])])
    log.opened("m", "d", "")
    log.flush()
    store.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lock", "log.1"]  # the old generation is gone
    st = read_log(load_anew(tmp_path), {"m": SPEC})  # a new process finds the newest one
    assert st.tag == "tag1" and set(st.live) == {"c", "d"}
    (tmp_path / "log.2.tmp").write_bytes(b"half a snapshot")  # a crash while writing the next one
    assert set(read_log(load_anew(tmp_path), {"m": SPEC}).live) == {"c", "d"}
    (tmp_path / "log.9").write_bytes(frame([OPEN, "m", "old", ""]))  # a crash between rename and unlink
    (tmp_path / "log.10").write_bytes(frame([OPEN, "m", "new", ""]))  # newest by number, not by name
    assert set(read_log(load_anew(tmp_path), {"m": SPEC}).live) == {"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lock", "log.10", "log.2.tmp"]  # older ones removed


def test_a_second_store_on_a_folder_in_use_is_refused_naming_it(tmp_path) -> None:
    first = FileStore(tmp_path)
    with pytest.raises(ValueError, match="PSN_STATE_DIR: .* is in use by another running service"):
        FileStore(tmp_path)
    first.close()
    FileStore(tmp_path).close()  # free again once the first is gone


def test_a_second_store_on_a_redis_database_in_use_is_refused_naming_the_holder(tmp_path) -> None:
    """Two services on one Redis database would overwrite each other's generations, as two on one folder
    would: the second is refused while the first's connection is open, a process killed with -9 frees it
    at once (no lease to wait out), another database is another log, and a Redis that lost the key while
    a second service took the log makes the first's next rewrite fail instead of writing over it."""
    import redis

    from service.core.journal import RedisStore, StoreTaken
    from tests.service.test_durable import RedisServer

    with RedisServer(tmp_path) as redis_srv:
        url = redis_srv.url
        first = RedisStore(url)
        with pytest.raises(ValueError, match=rf"PSN_STATE_URL: the session log on this Redis database is in use by "
                                             rf"another running service \(\S+ pid {os.getpid()}, connected from "):
            RedisStore(url)
        RedisStore(f"redis://127.0.0.1:{redis_srv.port}/1").close()  # another database: another log
        first.close()
        RedisStore(url).close()  # free again once the first is gone
        holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from service.core.journal import "
                                   f"RedisStore; s = RedisStore({url!r}); print('held', flush=True); time.sleep(60)"],
                                  cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(ValueError, match=f"pid {holder.pid}, connected from "):
            RedisStore(url)
        holder.kill()
        holder.wait(10)
        deadline = time.monotonic() + 10  # Redis drops the connection once the kernel has closed it
        while True:
            try:
                first = RedisStore(url)
                break
            except ValueError:
                assert time.monotonic() < deadline, "the killed holder's connection stayed open"
                time.sleep(0.01)
        first.rewrite(b"one")
        redis.Redis(port=redis_srv.port).flushall()  # Redis restarted empty: the key is gone
        second = RedisStore(url)  # nobody named as the holder: a second service takes the log
        with pytest.raises(StoreTaken, match="taken by another running service"):
            first.rewrite(b"two")
        assert second.load() == b""  # not written over
        second.close()
        first.rewrite(b"three")  # the holder gone, the first takes the log back at its next rewrite
        with pytest.raises(ValueError, match="in use by another running service"):
            RedisStore(url)
        first.close()
        probe = redis.Redis(port=redis_srv.port, single_connection_client=True)  # a restarted Redis numbers its clients
        probe.set("psn:owner", f"{probe.client_id()} 10.9.9.9:4000 elsewhere pid 7")  # anew: an id, another address
        first = RedisStore(url)  # not the connection the key names: taken
        probe.close()
        with pytest.raises(ValueError, match="in use by another running service"):
            RedisStore(url)
        assert first.load() == b"three"
        first.close()


def test_the_holders_connection_outlives_a_redis_that_closes_idle_clients(tmp_path) -> None:
    """A Redis with an idle-client timeout (here 1 s; hosted ones set minutes) closed the holder's connection
    while the service was quiet, and a second service was then let in: the holder keeps it busy (CLIENT ID)."""
    from service.core.journal import RedisStore
    from tests.service.test_durable import RedisServer

    with RedisServer(tmp_path, "--timeout", "1") as redis_srv:
        url = redis_srv.url
        first = RedisStore(url, keepalive_s=0.25)
        time.sleep(3)  # quiet past the idle timeout
        with pytest.raises(ValueError, match="in use by another running service"):
            RedisStore(url)
        first.close()


def test_a_redis_restarted_empty_has_the_log_and_its_holder_back(tmp_path) -> None:
    """redis-py reconnects under the appends without a word, so a Redis restarted empty took appends on a
    log that had lost its head, and with the key gone a second service was let in: the keepalive sees the
    holder's connection come back as another, claims the key again and fails the next append, so the engine
    core rewrites the log from memory."""
    import redis

    from service.core.journal import RedisStore, StoreLost, StoreTaken
    from tests.service.test_durable import RedisServer

    with RedisServer(tmp_path) as redis_srv:
        url = redis_srv.url
        first = RedisStore(url, keepalive_s=0.1)
        first.rewrite(b"head")
        redis_srv.restart()  # empty: --save "" --appendonly no
        deadline = time.monotonic() + 10
        with pytest.raises((StoreTaken, StoreLost)):  # the keepalive's notice, or the append's own check
            while time.monotonic() < deadline:
                first.append([b"step"])
                time.sleep(0.05)
        while redis.Redis(port=redis_srv.port).get("psn:owner") is None:  # the keepalive claims the key again
            assert time.monotonic() < deadline, "the holder did not claim the key again"
            time.sleep(0.05)
        with pytest.raises(ValueError, match="in use by another running service"):
            RedisStore(url)
        first.rewrite(b"head step")  # what the engine core's retry does
        first.append([b" more"])
        assert first.load() == b"head step more"
        first.close()


def test_a_redis_brought_back_from_an_older_snapshot_fails_the_next_append(tmp_path) -> None:
    """A Redis restored from an older snapshot (RDB, AOF) still names the log's generation, so the generation
    check let appends go on after records the snapshot lacked: a restart then rebuilt sessions at older steps.
    The append counts the generation's chunks, and one short of what this service wrote fails as lost."""
    import redis

    from service.core.journal import RedisStore, StoreLost
    from tests.service.test_durable import RedisServer

    with RedisServer(tmp_path) as redis_srv:
        store = RedisStore(redis_srv.url)
        store.rewrite(b"head")
        store.append([b" a"])
        store.append([b" b"])
        assert store.load() == b"head a b"
        redis.Redis(port=redis_srv.port).rpop(f"psn:log:{store.gen}")  # the snapshot was taken before " b"
        with pytest.raises(StoreLost, match="holds 2 chunks where this service wrote 3"):
            store.append([b" c"])
        store.rewrite(b"head a b c")  # what the engine core's retry does
        store.append([b" d"])
        assert store.load() == b"head a b c d"
        store.close()
        again = RedisStore(redis_srv.url)  # a restarted service counts what is there
        again.append([b" e"])
        assert again.load() == b"head a b c d e"
        again.close()


@pytest.mark.parametrize("url", ["http://x", "redis:/x", "/tmp/x"])
def test_bad_state_url_is_refused(url: str) -> None:
    from service.core.journal import open_store

    with pytest.raises(ValueError, match="PSN_STATE_URL"):
        open_store(None, url, False)


def test_one_flush_of_more_records_than_one_writev_takes(tmp_path) -> None:
    store = FileStore(tmp_path)
    log = SessionLog(store, {"m": SPEC}, compact_bytes=1 << 30)
    for i in range(700):  # 2 buffers each: 1400 > IOV_MAX
        log.opened("m", f"s{i}", "")
    log.flush()
    assert len(read_log(store.load(), {"m": SPEC}).live) == 700


def test_a_snapshot_of_sessions_that_took_no_step_yet() -> None:
    z = np.zeros((2, 0, 8), np.uint8)
    snap = snapshot_frame(SPEC, ["a", "b"], ["", ""], np.array([0, 0]), 0, 0, z, np.zeros((2, 0, 1), np.uint8),
                          np.zeros((2, 0, 2), np.float32), np.zeros((2, 2)))
    st = read_log(snap, {"m": SPEC})
    assert st.live["a"].t == 0 and st.live["b"].last_inputs(0, 8) == b""






# ----- contracts found by a mutation sweep (2026-12-07)


def test_recovery_keeps_only_the_replay_tail_of_inputs() -> None:
    rec = Recovered("m", "")
    for _ in range(5):
        rec.add_inputs(bytes(8), 1, 3, 8)
    assert rec.n_inputs == 3 and len(rec.inputs) == 3


def test_an_id_ended_again_in_the_log_is_the_newest_gone() -> None:
    log = (frame([END, ["a"], ["session_closed"], [""]]) + frame([END, ["b"], ["session_closed"], [""]])
           + frame([END, ["a"], ["session_expired"], [""]]))
    assert list(read_log(log, {}).gone) == ["b", "a"]


def test_an_id_opened_again_in_the_log_is_live_not_gone() -> None:
    log = frame([OPEN, "m", "a", ""]) + frame([END, ["a"], ["session_closed"], [""]]) + frame([OPEN, "m", "a", ""])
    st = read_log(log, {"m": SPEC})
    assert "a" in st.live and st.gone == {}


def test_compaction_is_due_past_its_limit_and_not_again_after_a_rewrite(tmp_path) -> None:
    one = len(frame([OPEN, "m", "a", ""]))
    log = SessionLog(FileStore(tmp_path), {"m": SPEC}, compact_bytes=one)
    log.opened("m", "a", "")
    log.flush()
    assert not log.due  # exactly at the limit
    log.opened("m", "b", "")
    log.flush()
    assert log.due
    log.rewrite([log.header("t")])
    assert not log.due


# ----- the stores and reading a log back, found by a second mutation sweep (2026-12-07)


def test_a_log_cut_right_after_its_first_frame_header_is_not_a_session_log() -> None:
    a = frame([OPEN, "m", "s1", ""])
    with pytest.raises(CorruptLog, match="not a session log"):  # a length and checksum, no body: nothing is known
        list(read_frames(a[:FRAME.size]))
    assert [h[2] for h, _ in read_frames(a + a[:FRAME.size])] == ["s1"]  # after a whole record: torn


def test_a_record_with_more_bytes_than_its_arrays_is_refused() -> None:
    f, _ = steps_frame(["a"], [0], 1, seed=1)
    head, raw = next(read_frames(f))
    longer = frame(head, bytes(raw) + b"\0")
    with pytest.raises(ValueError, match="expected"):
        read_log(frame([OPEN, "m", "a", ""]) + longer, {"m": SPEC})


def test_a_record_behind_a_sessions_step_makes_it_unrebuildable() -> None:
    f1, _ = steps_frame(["a"], [0], 2, seed=1)
    f2, _ = steps_frame(["a"], [1], 1, seed=2)  # step 1 again: the log does not say which one was applied
    assert read_log(frame([OPEN, "m", "a", ""]) + f1 + f2, {"m": SPEC}).live["a"].t == -1


def test_recovery_keeps_only_the_retry_window_of_outputs() -> None:
    rec = Recovered("m", "")
    for _ in range(5):
        rec.add_outputs(bytes(1), bytes(8), 1, 2, 1)
    assert rec.n_outputs == 2 and len(rec.outputs) == 2


def test_a_snapshot_holding_one_input_step() -> None:
    inputs = np.arange(2 * 8, dtype=np.uint8).reshape(2, 1, 8)
    snap = snapshot_frame(SPEC, ["a", "b"], ["", ""], np.array([1, 1]), 1, 0, inputs, np.zeros((2, 0, 1), np.uint8),
                          np.zeros((2, 0, 2), np.float32), np.zeros((2, 2)))
    st = read_log(snap, {"m": SPEC})
    assert [(r.n_inputs, r.last_inputs(1, 8)) for r in st.live.values()] == [(1, inputs[0].tobytes()),
                                                                            (1, inputs[1].tobytes())]


def test_a_rewrite_replaces_records_not_yet_flushed(tmp_path) -> None:
    """``rewrite`` replaces the log with its frames: a record collected before it must not land after them."""
    inputs = np.zeros((1, 3, 8), np.uint8)
    snap = snapshot_frame(SPEC, ["a"], [""], np.array([5]), 3, 0, inputs, np.zeros((1, 0, 1), np.uint8),
                          np.zeros((1, 0, 2), np.float32), np.zeros((1, 2)))
    store = FileStore(tmp_path)
    log = SessionLog(store, {"m": SPEC}, compact_bytes=1 << 20)
    log.opened("m", "a", "")  # not flushed yet
    log.rewrite([log.header("t"), snap])
    log.flush()
    assert read_log(store.load(), {"m": SPEC}).live["a"].t == 5
    store.close()


def test_a_state_dir_is_made_with_its_parents_and_fsync_is_kept(tmp_path) -> None:
    from service.core.journal import open_store

    store = open_store(tmp_path / "a" / "b", None, True)
    assert isinstance(store, FileStore) and store.fsync
    store.close()


def test_the_lock_file_names_only_the_pid_holding_it(tmp_path) -> None:
    (tmp_path / "lock").write_text("4194303999\n")  # a longer pid left by a service before
    store = FileStore(tmp_path)
    assert (tmp_path / "lock").read_text() == f"{os.getpid()}\n"
    store.close()


def test_fsync_after_each_append_only_when_asked_and_before_a_new_generation_takes_over(tmp_path, monkeypatch) -> None:
    """What reaches the disk is not visible from here without pulling the power: the calls are (a spy that
    records which file each ``os.fsync`` was for, then does it)."""
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    for asked in (False, True):
        d = tmp_path / str(asked)
        store = FileStore(d, fsync=asked)
        log = SessionLog(store, {"m": SPEC}, compact_bytes=1 << 20)
        log.opened("m", "a", "")
        log.flush()
        assert synced == ([str(d / "log.0")] if asked else [])
        synced.clear()
        log.rewrite([log.header("t")])
        assert synced == [str(d / "log.1.tmp")]  # the new generation is whole on disk before the old one goes
        synced.clear()
        store.close()


def test_a_log_kept_aside_is_kept_whole(tmp_path) -> None:
    from pathlib import Path

    store = FileStore(tmp_path)
    where = store.keep_aside(b"an unreadable log")
    assert Path(where).parent == tmp_path and Path(where).read_bytes() == b"an unreadable log"
    store.close()


def test_redis_store_generations(tmp_path) -> None:
    """The Redis store as a new process finds it: the newest generation, whole, and nothing else."""
    from service.core.journal import RedisStore
    from tests.service.test_durable import RedisServer

    with RedisServer(tmp_path) as redis_srv:
        url = redis_srv.url
        store = RedisStore(url)
        store.r.rpush("psn:log:1", b"left by a rewrite that did not finish")  # a crash before the switch
        log = SessionLog(store, {"m": SPEC}, compact_bytes=1 << 20)
        for sid in ("a", "b"):  # one chunk each
            log.opened("m", sid, "")
            log.flush()
        assert set(read_log(store.load(), {"m": SPEC}).live) == {"a", "b"}
        log.rewrite([log.header("t1"), frame([OPEN, "m", "c", ""])])
        log.opened("m", "d", "")
        log.flush()
        store.close()
        again = RedisStore(url)
        st = read_log(again.load(), {"m": SPEC})
        assert st.tag == "t1" and set(st.live) == {"c", "d"}
        assert sorted(again.r.keys("psn:log:*")) == [b"psn:log:1"]  # the old generation is gone
        where = again.keep_aside(b"an unreadable log")
        assert again.r.get(where) == b"an unreadable log"
        again.close()


def test_a_redis_store_over_a_unix_socket(tmp_path) -> None:
    import shutil

    from service.core.journal import RedisStore, open_store

    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    sock = tmp_path / "redis.sock"
    proc = subprocess.Popen([exe, "--port", "0", "--unixsocket", str(sock), "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        store = open_store(None, f"unix://{sock}", False)
        assert isinstance(store, RedisStore)
        store.append([frame([OPEN, "m", "a", ""])])
        assert set(read_log(store.load(), {"m": SPEC}).live) == {"a"}
        store.close()
    finally:
        proc.kill()
        proc.wait()


def test_a_rewrite_the_disk_has_no_room_for_leaves_no_half_copy(tmp_path) -> None:
    import errno

    from tests.service.test_durable import small_disk

    small_disk(tmp_path / "state", "64k")
    try:
        store = FileStore(tmp_path / "state")
        log = SessionLog(store, {"m": SPEC}, compact_bytes=1 << 20)
        log.opened("m", "a", "")
        log.flush()
        with pytest.raises(OSError) as e:
            log.rewrite([log.header("t"), frame([OPEN, "m", "b", ""], bytes(1 << 20))])
        assert e.value.errno == errno.ENOSPC
        assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["lock", "log.0"]  # no full, useless copy
        log.opened("m", "c", "")
        log.flush()  # the log goes on where it was
        assert set(read_log(store.load(), {"m": SPEC}).live) == {"a", "c"}
        store.close()
    finally:
        subprocess.run(["umount", "-l", str(tmp_path / "state")])


def test_an_append_cut_short_by_a_signal_writes_the_rest_in_order(tmp_path) -> None:
    """``os.writev`` returns early when a signal comes after part of the data went out (here the log is a
    pipe that fills up, and SIGALRM comes while the write waits): the rest follows, not a byte lost or
    written twice."""
    import signal
    import threading

    os.mkfifo(tmp_path / "log.0")
    got: list[bytes] = []
    alarmed = threading.Event()

    def read() -> None:
        with open(tmp_path / "log.0", "rb") as f:
            alarmed.wait(30)  # the pipe stays full until the signal cut the write short
            got.append(f.read())

    reader = threading.Thread(target=read)
    reader.start()
    store = FileStore(tmp_path)
    data = np.random.default_rng(0).integers(0, 255, 1 << 20, np.uint8)
    parts = [*frame_parts([OPEN, "m", "a", ""], data), *frame_parts([OPEN, "m", "b", ""], data[:1000])]
    old = signal.signal(signal.SIGALRM, lambda *_: alarmed.set())
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        store.append(parts)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        alarmed.set()
        store.close()
        reader.join()
    assert got == [b"".join(bytes(p) for p in parts)]


def test_a_redis_store_names_no_holder_for_an_owner_key_that_names_no_connection(tmp_path) -> None:
    from service.core.journal import RedisStore
    from tests.service.test_durable import RedisServer

    with RedisServer(tmp_path) as redis_srv:
        url = redis_srv.url
        RedisStore(url).close()
        store = RedisStore(url)
        store.r.set("psn:owner", "set by hand")  # not "<client id> <address> ...": nobody holds the log
        store.close()
        RedisStore(url).close()


def test_a_redis_that_refuses_client_commands_is_used_without_the_check_said_once(tmp_path, caplog) -> None:
    import redis

    from service.core.journal import RedisStore
    from tests.service.test_durable import RedisServer

    with RedisServer(tmp_path) as redis_srv:
        redis.Redis(port=redis_srv.port).acl_setuser("default", enabled=True, nopass=True,
                                                     commands=["+@all", "-client"], keys=["*"], channels=["*"])
        url = redis_srv.url
        with caplog.at_level("WARNING", logger="psn.journal"):
            store = RedisStore(url)
            store.rewrite(frame([OPEN, "m", "a", ""]))
            store.rewrite(frame([OPEN, "m", "b", ""]))
        assert set(read_log(store.load(), {"m": SPEC}).live) == {"b"}
        assert [r.getMessage().count("refuses CLIENT ID or CLIENT LIST") for r in caplog.records] == [1]
        store.close()


def test_a_stopped_redis_is_not_reachable(tmp_path) -> None:
    """The probe that decides whether a rewrite is worth trying answers False while Redis does not answer."""
    import signal

    from service.core.journal import RedisStore
    from tests.service.test_durable import RedisServer

    with RedisServer(tmp_path) as redis_srv:
        store = RedisStore(redis_srv.url)
        assert store.reachable()
        redis_srv.proc.send_signal(signal.SIGSTOP)
        try:
            assert not store.reachable()
        finally:
            redis_srv.proc.send_signal(signal.SIGCONT)
        assert store.reachable()
        store.close()
