"""Durable sessions: the engine core's session log, and rebuilding every session from it on start.

What a session needs to be rebuilt exactly is small, because a masked or sliding PSN net has a finite
receptive field (``PSNNet.replay_steps``): its last ``n(k-1)`` inputs, the running score sum, the
step count, plus the outputs of its last steps for retries (the retry window). The log records, at
each committed batch and before the answers leave the engine core, one record with that batch's
new inputs, outputs and score sums; opens and ends get their own records. On start the engine core
reads the log, keeps for each live session the tail it needs, and replays those inputs through the
step form from zero windows at step ``t - n(k-1)``, batched (``EngineCore.recover``). The step form
is batch-invariant (``model.functional.band_sum``, ``SpikingLayer.current_rows``), so the replayed
state equals the lost one bit for bit.

The log is a sequence of frames ``u32 length | u32 crc32 | body``; a body is ``u32 n | msgpack
header (n bytes) | raw arrays``. A torn last frame (a crash mid-write) ends the read there; any other
bad frame (a bad checksum) makes the whole log untrusted: what it held is unknown, so a session that
took steps after it would come back at an older step. Records (header first element):

- ``[0, {"tag": issuer tag, "models": {name: fingerprint}}]``: the first record of every generation;
- ``[1, model, sid, owner]``: a session opened (t = 0);
- ``[2, model, L, [sids], t0 int64 bytes]`` + inputs (B, L, row) + packed spikes (B, L, nb) + scores
  (B, L, C) + score sums (B, C): one committed batch of ``L`` new steps per session;
- ``[3, [sids], [reasons], [owners]]``: sessions that ended (closed, expired, lost): remembered (410 to
  their owner), not rebuilt;
- ``[4, model, [sids], [owners], t int64 bytes, n_in, n_out]`` + inputs (B, n_in, row) + spikes
  (B, n_out, nb) + scores (B, n_out, C) + score sums (B, C): a snapshot of live sessions.

The log grows by appends; past ``PSN_STATE_COMPACT_BYTES`` (and after each recovery) it is rewritten
as a new generation holding one snapshot of the live sessions, so a restart reads little. Stores:
``FileStore`` (``PSN_STATE_DIR``: one append-only file per generation, the new one written to a
temporary name and renamed into place) and ``RedisStore`` (``PSN_STATE_URL=redis://...``: a list of
frames per generation, switched in one transaction). Writes go to the OS at the end of each engine
turn, before the answers are sent: a killed engine loses nothing; a machine that loses power may
lose the OS's unwritten pages unless ``PSN_STATE_FSYNC=1``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import msgpack
import numpy as np

from service.config import BadSetting

log = logging.getLogger("psn.journal")
FRAME = struct.Struct("<II")  # length of body, crc32 of body
HEADER_LEN = struct.Struct("<I")
HEADER, OPEN, STEPS, END, SNAPSHOT = range(5)
IOV_MAX = 512  # buffers per writev call (Linux allows 1024)
# A Redis that hangs (stopped, a network partition) holds the engine core's loop for this long at one
# write, once; after that a PING with the short timeout decides whether a rewrite is worth trying.
REDIS_TIMEOUT_S = 2.0
PROBE_TIMEOUT_S = 0.25
KEEPALIVE_S = 20.0  # how often RedisStore asks for its owner connection's client id: under hosted idle timeouts


@dataclass(frozen=True)
class LogSpec:
    """The sizes the log needs for one model (from its ``ModelRunner``)."""

    name: str
    row: int  # bytes of one input step (wire dtype)
    spike_bytes: int
    classes: int
    wire: np.dtype  # scores
    sums: np.dtype  # score sums (the backend's dtype)
    replay: int | None  # inputs that rebuild the state (None: not rebuildable, e.g. LIF)
    window: int  # retry window (outputs kept)
    fingerprint: str  # weights, dtype and backend: a replay on other ones would not reproduce the outputs

    @property
    def out_row(self) -> int:
        return self.spike_bytes + self.classes * self.wire.itemsize


Buffer = bytes | memoryview


def flat(a: np.ndarray | Buffer) -> Buffer:
    """A byte view of an array or buffer (no copy when it is C-contiguous)."""
    if isinstance(a, np.ndarray):
        return memoryview(np.ascontiguousarray(a)).cast("B") if a.size else b""
    if isinstance(a, bytes):
        return a
    mv = memoryview(a)
    if mv.nbytes == 0:
        return b""
    return mv if mv.ndim == 1 and mv.itemsize == 1 else mv.cast("B")


def frame_parts(header: list[Any], *arrays: np.ndarray | Buffer) -> list[Buffer]:
    """One record as buffers to write one after the other: no copy of the arrays (a batch's inputs and
    outputs are most of a record; joining them measured 1.2 ms per 700 KB, mostly page faults)."""
    head = msgpack.packb(header, use_bin_type=True)
    parts = [HEADER_LEN.pack(len(head)) + head, *(flat(a) for a in arrays)]
    n, crc = 0, 0
    for p in parts:
        n += len(p)
        crc = zlib.crc32(p, crc)
    return [FRAME.pack(n, crc), *parts]


def frame(header: list[Any], *arrays: np.ndarray | Buffer) -> bytes:
    return b"".join(frame_parts(header, *arrays))


class CorruptLog(ValueError):
    """A log damaged before its end: the records after the damage cannot be read, so what the log says of
    any session may be out of date (a session that took steps after it would come back at an older step)."""


def read_frames(data: bytes | memoryview) -> Iterator[tuple[list[Any], memoryview]]:
    """(header, raw tail) of each whole, intact frame; stops at a torn last one (cut short by a crash
    mid-write: its answers never left). Raises ``CorruptLog`` for any other bad record (a whole one with a
    bad checksum, or the first: a log starts with a whole header record): what followed it is unknown."""
    mv, off = memoryview(data), 0
    while len(mv) - off >= FRAME.size:
        n, crc = FRAME.unpack_from(mv, off)
        body = mv[off + FRAME.size:off + FRAME.size + n]
        if len(body) < n or zlib.crc32(body) != crc:
            if off == 0 or len(body) == n:
                raise CorruptLog(f"session log: the record at byte {off} of {len(mv)} is corrupt (bad checksum or "
                                 f"length){'' if off else ': not a session log'}")
            log.warning("session log: a torn last record at byte %d of %d (a crash mid-write); reading stops there",
                        off, len(mv))
            return
        (h,) = HEADER_LEN.unpack_from(body, 0)
        yield msgpack.unpackb(body[4:4 + h], raw=False), body[4 + h:]
        off += FRAME.size + n


# ----- stores ------------------------------------------------------------------------------------
def store_error(e: BaseException | None) -> bool:
    """Whether ``e`` is the store failing (the OS's: disk full, read-only; Redis's: gone, too slow), not a bug."""
    return isinstance(e, OSError) or type(e).__module__.partition(".")[0] == "redis"


class Store(Protocol):
    def load(self) -> bytes: ...  # the current generation, whole

    def append(self, parts: list[Buffer]) -> None: ...

    def rewrite(self, data: bytes) -> None: ...  # a new generation holding ``data``, atomically

    def keep_aside(self, data: bytes) -> str: ...  # save a log recovery could not read; where it went

    def reachable(self) -> bool: ...  # cheap, quick: worth trying a rewrite now (after failures)

    def close(self) -> None: ...


class FileStore:
    """``dir/log.<generation>``: appended with ``os.write``; a new generation is written to
    ``log.<g>.tmp``, renamed into place, and the old one removed. ``dir/lock`` is held (``flock``) while
    the store is open, so a second service on the same folder is refused instead of rewriting the log
    under the first."""

    def __init__(self, directory: Path, fsync: bool = False):
        self.dir, self.fsync = Path(directory), fsync
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lock = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)  # one service per log: held until exit
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.lock, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self.lock)
            raise BadSetting(f"PSN_STATE_DIR: {str(self.dir)!r} is in use by another running service (its engine core, "
                             f"pid {holder}); two services on one session log would overwrite each other's records: "
                             "give each its own PSN_STATE_DIR (replicas share sessions with PSN_CLUSTER=1 and Redis, "
                             "docs/cluster.md)") from None
        os.ftruncate(self.lock, 0)
        os.pwrite(self.lock, f"{os.getpid()}\n".encode(), 0)
        gens = sorted(int(p.name.split(".")[1]) for p in self.dir.glob("log.*") if p.name.count(".") == 1
                      and p.name.split(".")[1].isdigit())
        self.gen = gens[-1] if gens else 0
        for g in gens[:-1]:  # a crash between rename and unlink leaves the older one behind
            (self.dir / f"log.{g}").unlink(missing_ok=True)
        self.fd = os.open(self._path(self.gen), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def _path(self, gen: int) -> Path:
        return self.dir / f"log.{gen}"

    def load(self) -> bytes:
        return self._path(self.gen).read_bytes()

    def append(self, parts: list[Buffer]) -> None:
        parts = [p for p in parts if len(p)]
        while parts:
            batch = parts[:IOV_MAX]
            n = os.writev(self.fd, batch)
            for p in batch:  # drop what was written (a short write leaves the rest of a part)
                if n >= len(p):
                    n -= len(p)
                    parts.pop(0)
                else:
                    parts[0] = memoryview(p)[n:]
                    break
        if self.fsync:
            os.fsync(self.fd)

    def rewrite(self, data: bytes) -> None:
        new = self.gen + 1
        tmp = self.dir / f"log.{new}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)  # the old generation goes next: this one must be whole on disk first
        except OSError:
            tmp.unlink(missing_ok=True)  # a full disk: a half-written copy would only keep it full
            raise
        finally:
            os.close(fd)
        os.replace(tmp, self._path(new))
        os.close(self.fd)
        self.fd = os.open(self._path(new), os.O_WRONLY | os.O_APPEND)
        self._path(self.gen).unlink(missing_ok=True)
        self.gen = new

    def reachable(self) -> bool:
        return True  # a failing disk fails a write at once: the rewrite itself is the probe

    def keep_aside(self, data: bytes) -> str:
        path = self.dir / f"unreadable.{self.gen}.{int(time.time())}"
        path.write_bytes(data)
        return str(path)

    def close(self) -> None:
        os.close(self.fd)
        os.close(self.lock)


class StoreTaken(OSError):
    """This service may not write the Redis session log as it stands (``RedisStore``): another running service
    holds it, or the connection that held it was dropped; a store failure to this one."""


class StoreLost(OSError):
    """The Redis session log is gone from under the service (Redis restarted empty, or flushed): a store
    failure, so the engine core rewrites the log from memory."""


class RedisStore:
    """``<prefix>:gen`` names the current generation; ``<prefix>:log:<g>`` is a list of appended chunks.
    A new generation is written, then ``gen`` switched and the old list deleted in one transaction.

    ``<prefix>:owner`` names the Redis connection of the service that holds the log (its client id and
    address, then host and pid for people), a connection kept open for that alone: a second service on
    the same Redis database is refused while it is open, as ``FileStore``'s lock refuses one on the same
    folder. When the holder's process ends, even by kill -9, the kernel closes the connection and Redis
    drops it at once, so a restarted service takes the log back without waiting for a lease to run
    out. A Redis that dropped that connection (restarted, empty or not) is seen by the keepalive, which
    claims the key again; the next append then fails, so the engine core rewrites the log from memory
    (a Redis restarted empty lost it) and claims it there too."""

    def __init__(self, url: str, prefix: str = "psn", keepalive_s: float = KEEPALIVE_S):
        import redis  # optional dependency: only with PSN_STATE_URL

        self.r = redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT_S)
        self.hold = redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT_S, single_connection_client=True)
        self.probe = redis.Redis.from_url(url, socket_timeout=PROBE_TIMEOUT_S, socket_connect_timeout=PROBE_TIMEOUT_S)
        self.prefix = prefix
        self.r.ping()
        self.checked = True
        self.holder: int | None = None  # hold's client id when it claimed the key
        self.lost = False  # hold came back as another connection (Redis restarted): appends fail until a rewrite
        self._claim(lambda held: BadSetting(
            f"PSN_STATE_URL: the session log on this Redis database is in use by another running service "
            f"({held}); two services on one session log would overwrite each other's records: give each its "
            "own database (redis://HOST:PORT/DB) or, for replicas that share sessions, PSN_CLUSTER=1 "
            "(docs/cluster.md)"))
        self.gen = int(self.r.get(f"{prefix}:gen") or 0)
        self.length = int(self.r.llen(self._key(self.gen)))  # chunks in the generation: each append adds one
        self.stopped = threading.Event()
        if self.checked:
            threading.Thread(target=self._keepalive, args=(keepalive_s,), name="redis-owner-keepalive",
                             daemon=True).start()

    def _keepalive(self, every_s: float) -> None:
        """CLIENT ID on the holder's connection every ``every_s``: a Redis that closes idle clients (its
        ``timeout`` setting, which some managed offerings set) would otherwise close it while the service
        is quiet, and a second service would be let in. (Failures are the store's to report, at its writes.)

        The connection answering with another client id means Redis dropped it (restarted, killed it) and
        redis-py reconnected, as it does under the appends too without a word: the key no longer names it,
        and a Redis restarted empty lost the log as well. So the key is claimed again at once, and ``lost``
        makes the next append fail, which has the engine core rewrite the log from memory."""
        import redis

        while not self.stopped.wait(every_s):
            try:
                if self.hold.client_id() != self.holder:
                    self.lost = True
                    self._claim(lambda held: StoreTaken(f"taken by another running service ({held})"))
            except (redis.RedisError, StoreTaken):
                pass

    def _claim(self, refuse: Callable[[str], Exception]) -> None:
        """Make ``hold``'s connection the log's holder, unless another open connection holds it: then
        ``refuse(who)`` is raised. A Redis that refuses CLIENT ID or CLIENT LIST (an ACL, a proxy) is
        used without the check (said once)."""
        import redis

        if not self.checked:
            return
        key = f"{self.prefix}:owner"
        try:
            me = self.hold.client_id()
            mine = f"{me} {self.hold.client_list(client_id=[me])[0]['addr']} {socket.gethostname()} pid {os.getpid()}"
            with self.r.pipeline() as p:
                while True:
                    try:
                        p.watch(key)
                        held = p.get(key)
                        if held is not None and held.decode(errors="replace") != mine and self._open(held):
                            _, addr, host, _, pid = (held.decode(errors="replace").split() + ["?"] * 5)[:5]
                            raise refuse(f"{host} pid {pid}, connected from {addr}")
                        p.multi()
                        p.set(key, mine)
                        p.execute()
                        self.holder = me
                        return
                    except redis.WatchError:  # another service got there between the read and the write
                        continue
        except redis.ResponseError as e:
            self.checked = False
            log.warning("PSN_STATE_URL: this Redis refuses CLIENT ID or CLIENT LIST (%s): a second service on "
                        "the same database would not be detected", e)

    def _open(self, held: bytes) -> bool:
        """Whether the connection ``held`` names (``"<client id> <address> ..."``) is still open."""
        parts = held.split()
        if len(parts) < 2 or not parts[0].isdigit():
            return False
        return any(c.get("addr") == parts[1].decode(errors="replace")
                   for c in self.r.client_list(client_id=[int(parts[0])]))

    def _key(self, gen: int) -> str:
        return f"{self.prefix}:log:{gen}"

    def reachable(self) -> bool:
        """Whether Redis answers a PING within ``PROBE_TIMEOUT_S``."""
        import redis

        try:
            return bool(self.probe.ping())
        except redis.RedisError:
            return False

    def load(self) -> bytes:
        return b"".join(self.r.lrange(self._key(self.gen), 0, -1))

    def append(self, parts: list[Buffer]) -> None:
        """Append to the current generation, checking in the same transaction that Redis still names it: a
        Redis restarted empty between two writes takes the append (a new connection, an empty list) into a
        log with no header and no sessions, and no ``gen`` key to find it by, so a restart then lost every
        session while each write had succeeded. Refused as a store failure instead (the record pushed to the
        stray list is deleted by the rewrite from memory that follows, which switches away from it)."""
        if self.lost:
            raise StoreTaken("the Redis connection that holds the session log was dropped (Redis restarted?); "
                             "the log is to be rewritten from memory")
        with self.r.pipeline(transaction=True) as p:
            p.get(f"{self.prefix}:gen")
            p.rpush(self._key(self.gen), b"".join(parts))
            gen, length = p.execute()
        if int(gen or 0) != self.gen:
            raise StoreLost(f"the session log is gone from Redis (generation {self.gen}, Redis names "
                            f"{int(gen or 0)}): restarted empty or flushed; it is rewritten from memory")
        if length != self.length + 1:
            # a Redis brought back from an older snapshot still names the generation, but lacks the newest records
            raise StoreLost(f"the session log in Redis holds {length - 1} chunks where this service wrote "
                            f"{self.length}: restored from an older snapshot?; it is rewritten from memory")
        self.length = length

    def rewrite(self, data: bytes) -> None:
        self.lost = False  # this rewrite puts back what a Redis restarted empty lost, and claims the key
        self._claim(lambda held: StoreTaken(f"the session log on this Redis database was taken by another running "
                                            f"service ({held}) while Redis was away: not written over"))
        new = self.gen + 1
        self.r.delete(self._key(new))
        self.r.rpush(self._key(new), data)
        with self.r.pipeline(transaction=True) as p:
            p.set(f"{self.prefix}:gen", new)
            p.delete(self._key(self.gen))
            p.execute()
        self.gen, self.length = new, 1

    def keep_aside(self, data: bytes) -> str:
        key = f"{self.prefix}:unreadable:{self.gen}:{int(time.time())}"
        self.r.set(key, data)
        return key

    def close(self) -> None:
        self.stopped.set()
        self.r.close()
        self.hold.close()
        self.probe.close()


def open_store(state_dir: Path | None, state_url: str | None, fsync: bool) -> Store | None:
    if state_url:
        if not state_url.startswith(("redis://", "rediss://", "unix://")):
            raise BadSetting(f"PSN_STATE_URL: expected redis://HOST:PORT/DB (or rediss://, unix://), got {state_url!r}")
        import redis

        try:
            return RedisStore(state_url)
        except redis.RedisError as e:  # the URL may hold a password: not repeated here
            raise BadSetting(f"PSN_STATE_URL: the session store cannot be reached: {e}") from None
    if state_dir:
        try:
            return FileStore(state_dir, fsync)
        except OSError as e:  # a file in its place, read-only, not ours to write: the log cannot be kept
            raise BadSetting(f"PSN_STATE_DIR: cannot keep the session log in {str(state_dir)!r} (a folder the "
                             f"service can write): {e.strerror}: {e.filename!r}") from None
    return None


# ----- reading a log back --------------------------------------------------------------------------
@dataclass
class Recovered:
    """One live session as the log left it."""

    model: str
    owner: str
    t: int = 0
    inputs: deque[bytes] = field(default_factory=deque)  # chunks of whole input rows, newest last
    n_inputs: int = 0  # steps held in ``inputs``
    outputs: deque[tuple[bytes, bytes]] = field(default_factory=deque)  # (spikes, scores) chunks
    n_outputs: int = 0
    sums: bytes = b""  # score sum after step t - 1 (empty: zeros)

    def add_inputs(self, chunk: bytes, n: int, keep: int, row: int) -> None:
        self.inputs.append(chunk)
        self.n_inputs += n
        while self.inputs and self.n_inputs - len(self.inputs[0]) // max(row, 1) >= keep:
            self.n_inputs -= len(self.inputs.popleft()) // max(row, 1)

    def add_outputs(self, spikes: bytes, scores: bytes, n: int, keep: int, spike_bytes: int) -> None:
        self.outputs.append((spikes, scores))
        self.n_outputs += n
        while self.outputs and self.n_outputs - len(self.outputs[0][0]) // spike_bytes >= keep:
            self.n_outputs -= len(self.outputs.popleft()[0]) // spike_bytes

    def last_inputs(self, n: int, row: int) -> bytes:
        data = b"".join(self.inputs)
        return data[len(data) - n * row:] if n else b""

    def last_outputs(self, n: int, spike_bytes: int, score_row: int) -> tuple[bytes, bytes]:
        sp, sc = b"".join(o[0] for o in self.outputs), b"".join(o[1] for o in self.outputs)
        return (sp[len(sp) - n * spike_bytes:], sc[len(sc) - n * score_row:]) if n else (b"", b"")


@dataclass
class LogState:
    tag: str | None = None
    fingerprints: dict[str, str] = field(default_factory=dict)
    live: dict[str, Recovered] = field(default_factory=dict)
    gone: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (reason, owner), oldest first
    records: int = 0


def read_log(data: bytes, specs: dict[str, LogSpec]) -> LogState:
    """Replay the records of ``data``; sessions of models not in ``specs`` are kept (and later lost)."""
    st = LogState()
    for header, raw in read_frames(data):
        st.records += 1
        kind = header[0]
        if kind == HEADER:
            st.tag = header[1].get("tag")
            st.fingerprints.update(header[1].get("models", {}))
        elif kind == OPEN:
            _, model, sid, owner = header
            st.live[sid] = Recovered(model, owner)
            st.gone.pop(sid, None)
        elif kind == END:
            owners = header[3] if len(header) > 3 else [""] * len(header[1])
            for sid, reason, owner in zip(header[1], header[2], owners, strict=True):
                st.live.pop(sid, None)
                st.gone.pop(sid, None)
                st.gone[sid] = (reason, owner)
        elif kind == STEPS:
            _, model, L, sids, t0b = header
            spec = specs.get(model)
            if spec is None:
                for sid in sids:
                    rec = st.live.get(sid)
                    if rec is not None:
                        rec.t = -1  # unknown model: cannot be rebuilt
                continue
            _read_rows(st, spec, sids, np.frombuffer(t0b, np.int64), L, raw)
        elif kind == SNAPSHOT:
            _, model, sids, owners, tb, n_in, n_out = header
            for sid, owner in zip(sids, owners, strict=True):
                st.live[sid] = Recovered(model, owner)
            spec = specs.get(model)
            if spec is None:
                for sid in sids:
                    st.live[sid].t = -1
                continue
            t = np.frombuffer(tb, np.int64)
            _read_snapshot(st, spec, sids, t, n_in, n_out, raw)
    return st


def _split(raw: memoryview, sizes: list[int]) -> list[memoryview]:
    out, off = [], 0
    for n in sizes:
        out.append(raw[off:off + n])
        off += n
    if off != len(raw):
        raise ValueError(f"session log: a record holds {len(raw)} bytes of arrays, expected {off}")
    return out


def _read_rows(st: LogState, spec: LogSpec, sids: list[str], t0: np.ndarray, L: int, raw: memoryview) -> None:
    B, score_row = len(sids), spec.classes * spec.wire.itemsize
    sum_row = spec.classes * spec.sums.itemsize
    inputs, spikes, scores, sums = _split(raw, [B * L * spec.row, B * L * spec.spike_bytes, B * L * score_row,
                                                B * sum_row])
    keep_in = spec.replay or 0
    for b, sid in enumerate(sids):
        rec = st.live.get(sid)
        if rec is None or rec.t < 0:
            continue
        if int(t0[b]) != rec.t:  # a gap: the log does not hold this session's whole history
            rec.t = -1
            continue
        rec.t += L
        if keep_in:
            rec.add_inputs(bytes(inputs[b * L * spec.row:(b + 1) * L * spec.row]), L, keep_in, spec.row)
        if spec.window:
            rec.add_outputs(bytes(spikes[b * L * spec.spike_bytes:(b + 1) * L * spec.spike_bytes]),
                            bytes(scores[b * L * score_row:(b + 1) * L * score_row]), L, spec.window,
                            spec.spike_bytes)
        rec.sums = bytes(sums[b * sum_row:(b + 1) * sum_row])


def _read_snapshot(st: LogState, spec: LogSpec, sids: list[str], t: np.ndarray, n_in: int, n_out: int,
                   raw: memoryview) -> None:
    B, score_row = len(sids), spec.classes * spec.wire.itemsize
    sum_row = spec.classes * spec.sums.itemsize
    inputs, spikes, scores, sums = _split(raw, [B * n_in * spec.row, B * n_out * spec.spike_bytes,
                                                B * n_out * score_row, B * sum_row])
    for b, sid in enumerate(sids):
        rec = st.live[sid]
        rec.t = int(t[b])
        if n_in:
            rec.add_inputs(bytes(inputs[b * n_in * spec.row:(b + 1) * n_in * spec.row]), n_in, n_in, spec.row)
        if n_out:
            rec.add_outputs(bytes(spikes[b * n_out * spec.spike_bytes:(b + 1) * n_out * spec.spike_bytes]),
                            bytes(scores[b * n_out * score_row:(b + 1) * n_out * score_row]), n_out, n_out,
                            spec.spike_bytes)
        rec.sums = bytes(sums[b * sum_row:(b + 1) * sum_row])


def fingerprint(weights_file: Path, dtype: str, backend: str) -> str:
    """What a replay's outputs depend on besides the inputs: the weights, the dtype, the backend."""
    h = hashlib.sha256()
    if weights_file.is_file():
        with open(weights_file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return json.dumps({"weights": h.hexdigest()[:16], "dtype": dtype, "backend": backend}, sort_keys=True)


# ----- writing -------------------------------------------------------------------------------------
class SessionLog:
    """Records collect during an engine turn and go to the store in one write (``flush``), before the
    turn's answers are sent."""

    def __init__(self, store: Store, specs: dict[str, LogSpec], compact_bytes: int):
        self.store, self.specs, self.compact_bytes = store, specs, compact_bytes
        self.pending: list[Buffer] = []
        self.written = 0  # bytes appended since the last rewrite

    def header(self, tag: str) -> bytes:
        return frame([HEADER, {"tag": tag, "models": {n: s.fingerprint for n, s in self.specs.items()}}])

    def opened(self, model: str, sid: str, owner: str) -> None:
        self.pending += frame_parts([OPEN, model, sid, owner])

    def ended(self, sids: list[str], reasons: list[str], owners: list[str]) -> None:
        self.pending += frame_parts([END, sids, reasons, owners])

    def steps(self, model: str, L: int, sids: list[str], t0: np.ndarray, inputs: bytes, spikes: np.ndarray,
              scores: np.ndarray, sums: np.ndarray) -> None:
        self.pending += frame_parts([STEPS, model, L, sids, t0.astype(np.int64).tobytes()], inputs, spikes, scores,
                                    sums)

    def flush(self) -> None:
        if self.pending:
            parts, self.pending = self.pending, []
            self.store.append(parts)
            self.written += sum(len(p) for p in parts)

    @property
    def due(self) -> bool:
        """Time to rewrite the log as one snapshot."""
        return self.written > self.compact_bytes

    def rewrite(self, frames: list[bytes]) -> int:
        """Replace the log with ``frames`` (a header and a snapshot); bytes written."""
        self.flush()
        data = b"".join(frames)
        self.store.rewrite(data)
        self.written = 0
        return len(data)


def snapshot_frame(spec: LogSpec, sids: list[str], owners: list[str], t: np.ndarray, n_in: int, n_out: int,
                   inputs: np.ndarray, spikes: np.ndarray, scores: np.ndarray, sums: np.ndarray) -> bytes:
    return frame([SNAPSHOT, spec.name, sids, owners, t.astype(np.int64).tobytes(), n_in, n_out], inputs, spikes,
                 scores, sums)
