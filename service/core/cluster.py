"""Sessions shared by replicas (``PSN_CLUSTER=1`` with ``PSN_STATE_URL=redis://...``): one log and one
lease per session in Redis, so any replica can take a session over, on demand, with the same outputs.

Keys (``prefix`` is ``PSN_CLUSTER_PREFIX``, default ``psn``):

- ``{prefix}:s:{sid}``: the session's records, a Redis list of the frames of ``journal.py`` (a header
  frame with the model's fingerprint, the open record, one steps record per committed batch, an end
  record); rewritten as header + one snapshot frame once it holds ``PSN_CLUSTER_SESSION_RECORDS``.
- ``{prefix}:lease:{sid}``: ``"{replica}:{nonce}"``, the fencing token of the replica that serves it.
- ``{prefix}:owner:{sid}``: the session's owner (``""`` without access control), written with its open,
  steps and snapshot records and expiring with its log, so a claim can be refused before it moves
  anything: to another owner a session is answered as one that does not exist, and it stays where it is.
- ``{prefix}:tag``: the issuer tag every replica gives new session ids (``sessions.make_id``).

Who serves a session is decided by the router in front (a consistent hash of the session id): a
replica asked about a session it does not hold *claims* it (one Lua script: unless the session is
another owner's, a new token in the lease, the records read back, atomically) and replays it
(``EngineCore.adopt``). Every write of a replica is one Lua script per engine turn that appends each
session's records only if the lease still holds that replica's token; a session whose token changed was
claimed by another replica, so its records are not written, the requests they answer are refused with
409 ``session_moved`` instead, and the session is dropped here. So a session never advances on two
replicas at once, and what a client was told was applied is always in the log of the replica that serves
the session next.
"""

from __future__ import annotations

import logging
import secrets

from service.core.journal import Buffer, store_error
from service.errors import StoreUnavailable

log = logging.getLogger("psn.cluster")

# ARGV: prefix, live ttl ms, ended ttl ms, then (op, sid, token, owner, data) per record, in order.
# op o: open (the lease becomes token, the log starts over); a: append; e: append the end record and
# free the lease; r: rewrite (the log becomes data). a, e, r only while the lease is token. o, a and r
# also write the session's owner (the key a claim checks), e lets it expire with the log.
# Returns the sids refused (their lease moved on), but not those opened again after the refusal.
FLUSH = """
local p, live_ttl, ended_ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local refused = {}
for i = 4, #ARGV, 5 do
  local op, sid, token, owner, data = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local lk, sk, ok = p .. ':lease:' .. sid, p .. ':s:' .. sid, p .. ':owner:' .. sid
  if op == 'o' then
    refused[sid] = nil
    redis.call('SET', lk, token, 'PX', live_ttl)
    redis.call('DEL', sk)
    redis.call('RPUSH', sk, data)
    redis.call('PEXPIRE', sk, live_ttl)
    redis.call('SET', ok, owner, 'PX', live_ttl)
  elseif redis.call('GET', lk) ~= token then
    refused[sid] = true
  elseif op == 'a' then
    redis.call('RPUSH', sk, data)
    redis.call('PEXPIRE', sk, live_ttl)
    redis.call('PEXPIRE', lk, live_ttl)
    redis.call('SET', ok, owner, 'PX', live_ttl)
  elseif op == 'e' then
    redis.call('RPUSH', sk, data)
    redis.call('PEXPIRE', sk, ended_ttl)
    redis.call('PEXPIRE', ok, ended_ttl)
    redis.call('DEL', lk)
  elseif op == 'r' then
    redis.call('DEL', sk)
    redis.call('RPUSH', sk, data)
    redis.call('PEXPIRE', sk, live_ttl)
    redis.call('SET', ok, owner, 'PX', live_ttl)
  end
end
local out = {}
for sid in pairs(refused) do out[#out + 1] = sid end
return out
"""

# KEYS: lease, log, owner. ARGV: new token, live ttl ms, the asking owner. Nothing, and nothing changed, when
# the session has no records or is another owner's (a log written before the owner key was: any owner). The
# log and owner key live at least the live ttl on, never less than they had: an ended session's keep the
# ended ttl (read to answer 410, it must not expire sooner for that).
CLAIM = """
if redis.call('EXISTS', KEYS[2]) == 0 then return false end
local owner = redis.call('GET', KEYS[3])
if owner and owner ~= ARGV[3] then return false end
local ttl = tonumber(ARGV[2])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
for i = 2, 3 do
  if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
end
return redis.call('LRANGE', KEYS[2], 0, -1)
"""


class ClusterStore:
    """The Redis side of shared sessions: claims, and one fenced write per engine turn."""

    def __init__(self, url: str, replica: str, prefix: str = "psn", live_ttl_s: float = 3600.0,
                 ended_ttl_s: float = 86400.0):
        import redis  # optional dependency: only with PSN_STATE_URL

        self.r = redis.Redis.from_url(url, socket_timeout=10)
        self.r.ping()
        self.replica, self.prefix = replica, prefix
        self.live_ttl_ms, self.ended_ttl_ms = int(live_ttl_s * 1000), int(ended_ttl_s * 1000)
        self._flush = self.r.register_script(FLUSH)
        self._claim = self.r.register_script(CLAIM)
        self.tokens: dict[str, str] = {}  # sid -> this replica's lease token
        self.ops: list[tuple[str, str, str, str, bytes]] = []  # (op, sid, token, owner, data)

    def shared_tag(self, mine: str) -> str:
        """The issuer tag of every replica (the first one to start sets it)."""
        key = f"{self.prefix}:tag"
        self.r.set(key, mine, nx=True)
        return (self.r.get(key) or mine.encode()).decode()

    def _token(self) -> str:
        """A fresh fencing token of this replica."""
        return f"{self.replica}:{secrets.token_hex(6)}"

    def new_token(self, sid: str) -> str:
        token = self.tokens[sid] = self._token()
        return token

    def claim(self, sid: str, owner: str = "") -> bytes | None:
        """Take the lease of ``sid`` (whoever held it) and read its records; None if it has none or is not
        ``owner``'s (then nothing changes)."""
        return self.claim_many([sid], [owner])[0]

    def claim_many(self, sids: list[str], owners: list[str] | None = None) -> list[bytes | None]:
        """``claim`` for many sessions in one round trip (``owners``: the asking owner of each, "" by default).
        A sid may come more than once (asked for by several owners): only its own owner's claim is granted."""
        keys = [(f"{self.prefix}:lease:{sid}", f"{self.prefix}:s:{sid}", f"{self.prefix}:owner:{sid}")
                for sid in sids]
        tokens = [self._token() for _ in sids]
        try:
            with self.r.pipeline(transaction=False) as pipe:
                for k, token, owner in zip(keys, tokens, owners or [""] * len(sids), strict=True):
                    self._claim(keys=list(k), args=[token, self.live_ttl_ms, owner], client=pipe)
                out = pipe.execute()
        except Exception as e:
            if store_error(e):  # Redis gone or too slow: 503, retry (a bug stays a bug: 500)
                raise StoreUnavailable.claiming(sids[0] if len(sids) == 1 else f"{len(sids)} sessions", e) from e
            raise
        for sid in sids:
            self.tokens.pop(sid, None)
        for sid, token, chunks in zip(sids, tokens, out, strict=True):
            if chunks is not None:
                self.tokens[sid] = token
        return [None if chunks is None else b"".join(chunks) for chunks in out]

    def holds(self, sid: str) -> bool:
        """Whether this replica's lease on ``sid`` still stands (one round trip: for rare paths only)."""
        token = self.tokens.get(sid)
        return token is not None and self.r.get(f"{self.prefix}:lease:{sid}") == token.encode()

    def add(self, op: str, sid: str, parts: list[Buffer] | bytes, owner: str = "") -> None:
        """Record ``op`` of ``sid`` for this turn's write; ``owner`` (the session's) is written with o, a, r."""
        # Each record is fenced by the token of its time: an OIP sequence started again ends the old
        # session (its token) and opens the new one (a new token) in the same turn.
        token = self.new_token(sid) if op == "o" else self.tokens.get(sid)
        if token is None:
            return  # not ours (dropped after a move): nothing to write
        self.ops.append((op, sid, token, owner, parts if isinstance(parts, bytes) else b"".join(parts)))

    def flush(self) -> set[str]:
        """Write this turn's records; the sids whose lease moved on (their records were not written)."""
        if not self.ops:
            return set()
        ops, self.ops = self.ops, []
        args: list[bytes | str | int] = [self.prefix, self.live_ttl_ms, self.ended_ttl_ms]
        for op, sid, token, owner, data in ops:
            args += [op, sid, token, owner, data]
        for op, sid, token, _, _ in ops:
            if op == "e" and self.tokens.get(sid) == token:  # not a session of that id opened since
                self.tokens.pop(sid, None)
        refused = {s.decode() if isinstance(s, bytes) else s for s in self._flush(args=args)}
        for sid in refused:
            self.tokens.pop(sid, None)
        return refused

    def forget(self, sid: str) -> None:
        self.tokens.pop(sid, None)

    def close(self) -> None:
        self.r.close()
