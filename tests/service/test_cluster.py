"""Replicas sharing sessions through Redis (issue 12, ``PSN_CLUSTER=1``): a replica asked about a session
another one holds takes it over with the same outputs; the old holder then refuses the session's steps
with 409 ``session_moved``; a replica killed with SIGKILL loses nothing. Real processes: two
``python -m service`` replicas and a real redis-server, no proxy (the tests choose the replica).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import torch
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from service.core.sessions import id_tag
from tests.service.conftest import DEFAULTS, ROOT, Reference, Server, assert_outputs, free_port, oip_sequence
from tests.service.test_durable import redis_server

T = 30
T_ALL = 22  # the masked model's horizon is 24


@pytest.fixture
def cluster(serve, tmp_path):
    """``cluster(n, **settings)``: n replicas (A, B, ...) sharing one redis-server."""
    procs: list[subprocess.Popen] = []

    def start(n: int = 2, **settings) -> list[Server]:
        proc, port = redis_server(tmp_path)
        procs.append(proc)
        url = f"redis://127.0.0.1:{port}/0"
        return [serve(cluster=1, state_url=url, replica_id=chr(ord("A") + i), **settings) for i in range(n)]

    yield start
    for p in procs:
        p.kill()
        p.wait()


def shut_down_redis(srv: Server) -> None:
    """Stop the redis-server of replica ``srv``'s cluster (no save): the store is gone under it."""
    import contextlib

    import redis

    with contextlib.suppress(redis.ConnectionError):  # it closes the connection as it goes
        redis.Redis.from_url(srv.settings["state_url"]).shutdown(nosave=True)


def steps(c: httpx.Client, sid: str, x, start: int, n: int) -> httpx.Response:
    return c.post(f"/v1/sessions/{sid}/steps", json={"start": start, "steps": x[start:start + n].tolist()})


def test_a_session_moves_to_the_replica_asked_and_the_old_one_refuses_it(cluster, ref: Reference) -> None:
    a, b = cluster(2, cluster_session_records=4)  # long logs are rewritten as snapshots along the way
    x = ref.sequence("sliding", T, seed=7)
    expected = ref.outputs("sliding", x)
    with httpx.Client(base_url=a.url, timeout=20) as ca, httpx.Client(base_url=b.url, timeout=20) as cb:
        sid = ca.post("/v1/sessions", json={"model": "sliding"}).json()["session_id"]
        outputs = []
        for start in range(0, 12, 2):  # 6 records on A: one rewrite
            r = steps(ca, sid, x, start, 2)
            assert r.status_code == 200, r.text
            outputs += r.json()["outputs"]
        r = steps(cb, sid, x, 12, 5)  # the router now sends it to B: B takes it over
        assert r.status_code == 200, r.text
        outputs += r.json()["outputs"]
        r = steps(ca, sid, x, 17, 3)  # a client still on A (an old connection): refused, not applied
        assert r.status_code == 409 and r.json()["error"]["code"] == "session_moved", r.text
        r = steps(cb, sid, x, 17, 3)  # its retry lands on B
        assert r.status_code == 200, r.text
        outputs += r.json()["outputs"]
        r = steps(cb, sid, x, 18, 12)  # a retry overlapping what B applied: answered again, not re-applied
        assert r.status_code == 200 and r.json()["start"] == 18, r.text
        outputs += r.json()["outputs"][2:]
        assert_outputs(outputs, expected)
        assert cb.get(f"/v1/sessions/{sid}").json()["steps_seen"] == T
        assert ca.get(f"/v1/sessions/{sid}").json()["steps_seen"] == T  # asking A moves it back, state intact
        r = cb.post(f"/v1/sessions/{sid}/steps", json={"start": T, "steps": [[0.5, 0.5, 0.5]]})
        assert r.status_code == 409 and r.json()["error"]["code"] == "session_moved", r.text  # refused at its write
        assert ca.delete(f"/v1/sessions/{sid}").status_code == 204
        r = cb.get(f"/v1/sessions/{sid}")  # ended in the shared log: every replica says so
        assert r.status_code == 410 and r.json()["error"]["code"] == "session_closed", r.text
        assert cb.get("/v1/sessions/made-up").status_code == 404
        other = cb.post("/v1/sessions", json={"model": "sliding"}).json()["session_id"]
        assert id_tag(other) == id_tag(sid) is not None  # every replica issues ids under the cluster's one tag
    text = httpx.get(f"{b.url}/metrics").text
    assert 'psn_sessions_adopted_total{replica="B",model="sliding"} 1.0' in text, text
    assert 'psn_sessions_moved_total{replica="B",model="sliding"} 1.0' in text
    assert httpx.get(f"{a.url}/healthz").json()["replica"] == "A"


def test_a_replica_killed_with_sigkill_loses_no_session(cluster, ref: Reference) -> None:
    a, b = cluster(2)
    models = ("sliding", "masked", "conv")
    xs = [ref.sequence(models[i % 3], T_ALL, seed=50 + i) for i in range(12)]
    outputs: list[list[dict]] = [[] for _ in xs]
    with httpx.Client(base_url=a.url, timeout=20) as ca:
        sids = [ca.post("/v1/sessions", json={"model": models[i % 3]}).json()["session_id"] for i in range(12)]
        for i, sid in enumerate(sids):
            r = steps(ca, sid, xs[i], 0, 7 + i)
            assert r.status_code == 200, r.text
            outputs[i] += r.json()["outputs"]
    assert a.proc is not None
    for p in [*_children(a.proc.pid), a.proc.pid]:  # the whole replica: engine core, front ends, supervisor
        os.kill(p, signal.SIGKILL)
    a.proc.wait()
    with httpx.Client(base_url=b.url, timeout=20) as cb:
        for i, sid in enumerate(sids):  # each client re-sends from its last acknowledged step, now to B
            acked = len(outputs[i])
            r = steps(cb, sid, xs[i], acked, T_ALL - acked)
            assert r.status_code == 200, r.text
            outputs[i] += r.json()["outputs"]
            assert_outputs(outputs[i], ref.outputs(models[i % 3], xs[i]))



def test_another_keys_request_for_a_session_takes_nothing_over(cluster, ref: Reference) -> None:
    """With access control on, key B asking a replica that does not hold key A's session about it (a read, a
    step, a close, an attach) is answered as for an id that never existed, and changes nothing: the claim is
    refused before it moves the lease, so A's replica keeps the session and A's next step there is answered,
    not 409 session_moved. Once A has closed it, B is still told 404, not 410."""
    import redis

    from service.core.sessions import make_id
    from tests.service.test_auth import KEY_A, KEY_B, ask, auth, same_error

    a, b = cluster(2, api_keys=f"{KEY_A},{KEY_B}")
    x = ref.sequence("sliding", 8, seed=13)
    r = redis.Redis.from_url(a.settings["state_url"])
    with httpx.Client(base_url=a.url, timeout=20, headers=auth(KEY_A)) as ca, \
            httpx.Client(base_url=b.url, timeout=20, headers=auth(KEY_B)) as cb:
        sid = ca.post("/v1/sessions", json={"model": "sliding"}).json()["session_id"]
        got = steps(ca, sid, x, 0, 3)
        assert got.status_code == 200, got.text
        outputs = got.json()["outputs"]
        missing = make_id(id_tag(sid) or "")  # an id of this cluster's tag that was never opened
        lease = r.get(f"psn:lease:{sid}")
        assert lease is not None and lease.startswith(b"A:"), lease
        for method, path, body in (("GET", "", None), ("POST", "/steps", {"steps": x[3:4].tolist()}),
                                   ("POST", "/steps", {"steps": x[3:4].tolist(), "start": 3}),
                                   ("DELETE", "", None)):
            theirs = cb.request(method, f"/v1/sessions/{sid}{path}", json=body)
            nothing = cb.request(method, f"/v1/sessions/{missing}{path}", json=body)
            assert theirs.status_code == 404 and same_error(theirs, nothing, sid, missing), (method, theirs.text)
            assert r.get(f"psn:lease:{sid}") == lease, method  # still A's, the same token
        with connect(b.ws_url, additional_headers=auth(KEY_B), open_timeout=10) as ws:
            theirs, nothing = (ask(ws, {"type": "attach", "session_id": i}) for i in (sid, missing))
            assert theirs["error"]["code"] == "session_not_found", theirs
            assert theirs == json.loads(json.dumps(nothing).replace(missing, sid))
        with connect(f"{b.ws_url}?session_id={sid}", additional_headers=auth(KEY_B), open_timeout=10) as ws:
            assert ask(ws, {"type": "attach", "session_id": sid}) == theirs  # routed by the id, as a proxy would
        assert r.get(f"psn:lease:{sid}") == lease
        got = steps(ca, sid, x, 3, 5)  # A's next step, on its own replica
        assert got.status_code == 200, got.text
        assert_outputs(outputs + got.json()["outputs"], ref.outputs("sliding", x))
        assert ca.get(f"/v1/sessions/{sid}").json()["steps_seen"] == 8
        assert ca.delete(f"/v1/sessions/{sid}").status_code == 204
        theirs, nothing = (cb.get(f"/v1/sessions/{i}") for i in (sid, missing))  # ended in the shared log
        assert theirs.status_code == 404 and same_error(theirs, nothing, sid, missing), theirs.text
        mine = httpx.get(f"{b.url}/v1/sessions/{sid}", headers=auth(KEY_A), timeout=20)
        assert mine.status_code == 410 and mine.json()["error"]["code"] == "session_closed", mine.text
    assert adopted(b) == 0 and adopted(a, "psn_sessions_moved_total") == 0

def test_a_retry_on_the_old_replica_is_not_answered_from_its_stale_copy(cluster, ref: Reference) -> None:
    """A retry whose steps were all applied (start + L <= steps_seen) is answered from the retry window and
    writes nothing, so the fenced write never told the replica that another one had claimed the session since:
    the old replica answered it 200 from its stale copy, with an old steps_seen (5 where the session was at 8),
    and even for a session its owner had closed on the other replica (200 where every replica must say 409
    session_moved or 410). Such a retry now checks the lease first, as reads do."""
    a, b = cluster(2)
    x = ref.sequence("sliding", 10, seed=21)
    expected = ref.outputs("sliding", x)
    with httpx.Client(base_url=a.url, timeout=20) as ca, httpx.Client(base_url=b.url, timeout=20) as cb:
        sid = ca.post("/v1/sessions", json={"model": "sliding"}).json()["session_id"]
        assert steps(ca, sid, x, 0, 5).status_code == 200
        assert steps(cb, sid, x, 5, 3).status_code == 200  # B takes it over: 8 steps
        r = steps(ca, sid, x, 2, 3)  # a retry of steps 2..4 sent to A, which still holds its copy at 5
        assert r.status_code == 409 and r.json()["error"]["code"] == "session_moved", r.text
        r = steps(ca, sid, x, 2, 3)  # sent again: A claims it back
        assert r.status_code == 200 and r.json()["steps_seen"] == 8, r.text
        assert_outputs(r.json()["outputs"], expected, start=2)
        assert ca.delete(f"/v1/sessions/{sid}").status_code == 204  # closed on A; B still holds its copy at 8
        r = steps(cb, sid, x, 6, 2)
        assert r.status_code == 409 and r.json()["error"]["code"] == "session_moved", r.text
        r = steps(cb, sid, x, 6, 2)
        assert r.status_code == 410 and r.json()["error"]["code"] == "session_closed", r.text


def test_another_keys_read_on_the_old_replica_changes_nothing_there(cluster, ref: Reference) -> None:
    """Key B's GET (or attach, or close) of key A's id on a replica holding a stale copy of it checked the lease
    before the owner: the replica found the session claimed elsewhere and dropped its copy (a 'session moved'
    line, psn_sessions_moved_total + 1), then answered B 404. So B's request changed what A was told next there:
    A's step was claimed and answered instead of 409 session_moved. The owner is now compared first."""
    from tests.service.test_auth import KEY_A, KEY_B, auth

    a, b = cluster(2, api_keys=f"{KEY_A},{KEY_B}")
    x = ref.sequence("sliding", 8, seed=31)
    with httpx.Client(base_url=a.url, timeout=20, headers=auth(KEY_A)) as ca, \
            httpx.Client(base_url=b.url, timeout=20, headers=auth(KEY_A)) as cb:
        sid = ca.post("/v1/sessions", json={"model": "sliding"}).json()["session_id"]
        assert steps(ca, sid, x, 0, 3).status_code == 200
        assert steps(cb, sid, x, 3, 2).status_code == 200  # B takes it over; A keeps a stale copy
        for method in ("GET", "DELETE"):
            r = httpx.request(method, f"{a.url}/v1/sessions/{sid}", headers=auth(KEY_B), timeout=20)
            assert r.status_code == 404, r.text
        text = ca.get("/metrics").text
        assert not [line for line in text.splitlines() if line.startswith("psn_sessions_moved_total{")
                    and not line.endswith(" 0.0")], text
        r = steps(ca, sid, x, 5, 2)  # the owner on the old replica: as if key B had sent nothing
        assert r.status_code == 409 and r.json()["error"]["code"] == "session_moved", r.text
        r = steps(ca, sid, x, 5, 2)
        assert r.status_code == 200 and r.json()["steps_seen"] == 7, r.text


def test_a_past_horizon_refusal_on_the_old_replica_is_not_answered_from_its_stale_copy(cluster, ref: Reference
                                                                                        ) -> None:
    """A masked-PSN step past the horizon is refused in the engine turn, before anything is written, so no fenced
    write told the old replica that another one had claimed the session since: it refused from its stale copy,
    naming an old step (22 where the session was at 23) and even for a session its owner had closed on the other
    replica (422 where 410 is due). Such a refusal now checks the lease first, as step_gap's does."""
    a, b = cluster(2)
    x = ref.sequence("masked", 24, seed=23)
    with httpx.Client(base_url=a.url, timeout=20) as ca, httpx.Client(base_url=b.url, timeout=20) as cb:
        sid = ca.post("/v1/sessions", json={"model": "masked"}).json()["session_id"]
        assert steps(ca, sid, x, 0, 22).status_code == 200
        assert steps(cb, sid, x, 22, 1).status_code == 200  # B takes it over: 23 steps; A keeps its copy at 22
        more = {"steps": x[:4].tolist()}
        r = ca.post(f"/v1/sessions/{sid}/steps", json=more)
        assert r.status_code == 409 and r.json()["error"]["code"] == "session_moved", r.text
        r = ca.post(f"/v1/sessions/{sid}/steps", json=more)  # sent again: A claims it back, at step 23
        assert r.status_code == 422 and "at step 23, so at most 1 more fit" in r.json()["error"]["message"], r.text
        assert ca.delete(f"/v1/sessions/{sid}").status_code == 204  # closed on A; B keeps its copy at 23
        r = cb.post(f"/v1/sessions/{sid}/steps", json=more)
        assert r.status_code == 409 and r.json()["error"]["code"] == "session_moved", r.text
        r = cb.post(f"/v1/sessions/{sid}/steps", json=more)
        assert r.status_code == 410 and r.json()["error"]["code"] == "session_closed", r.text


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def adopted(srv: Server, metric: str = "psn_sessions_adopted_total") -> float:
    """Sessions this replica took over from another one (its /metrics, asked directly; or ``metric``)."""
    text = httpx.get(f"{srv.url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(metric + "{"))


class Client:
    """One session behind the proxy; re-sends from its last acknowledged step after any failure."""

    def __init__(self, base: str, model: str, x, ws: bool):
        self.base, self.model, self.x, self.ws_mode = base, model, x, ws
        # a new connection per request: each request is routed on its own, as from many clients and proxies
        self.http = httpx.Client(base_url=f"http://{base}", timeout=20, headers={"connection": "close"})
        self.sid = self.http.post("/v1/sessions", json={"model": model}).json()["session_id"]
        self.outputs: list[dict] = []
        self.ws = None

    def send(self, n: int) -> bool:
        start = len(self.outputs)
        body: dict = {}
        try:
            if self.ws_mode:
                if self.ws is None:
                    self.ws = connect(f"ws://{self.base}/v1/stream?session_id={self.sid}", open_timeout=5).__enter__()
                    self.ws.send(json.dumps({"type": "attach", "session_id": self.sid}))
                    assert json.loads(self.ws.recv(timeout=20))["type"] == "attached"
                self.ws.send(json.dumps({"type": "steps", "start": start, "steps": self.x[start:start + n].tolist()}))
                body = json.loads(self.ws.recv(timeout=20))
                ok = body["type"] == "steps"
            else:
                r = steps(self.http, self.sid, self.x, start, n)
                body, ok = r.json(), r.status_code == 200
        except (httpx.TransportError, ConnectionClosed, OSError, TimeoutError, AssertionError, ValueError):
            ok = False
        if not ok:
            code = body.get("error", {}).get("code") if isinstance(body.get("error"), dict) else None
            assert code in (None, "engine_unavailable", "session_moved"), body
            if self.ws is not None:
                self.ws.close()
                self.ws = None
            return False
        self.outputs += body["outputs"]
        return True


def test_an_ended_session_whose_shared_log_expired_is_still_410_to_its_owner_on_the_replica_that_ended_it(
        cluster, ref: Reference) -> None:
    """Once an ended session's log has left Redis (a day after its end), a replica that does not hold it claims
    nothing and answers from what it remembers itself (PSN_REMEMBER_GONE): the replica that closed it
    remembers it as closed by its owner, so the owner is told 410 session_closed over a read and a step
    (once told 404, as the claim's empty answer was judged as for no owner), another key 404."""
    import redis

    from tests.service.test_auth import KEY_A, KEY_B, auth

    (a,) = cluster(1, api_keys=f"{KEY_A},{KEY_B}")
    x = ref.sequence("sliding", 8, seed=17)
    r = redis.Redis.from_url(a.settings["state_url"])
    with httpx.Client(base_url=a.url, timeout=20) as c:
        sid = c.post("/v1/sessions", headers=auth(KEY_A), json={"model": "sliding"}).json()["session_id"]
        got = c.post(f"/v1/sessions/{sid}/steps", headers=auth(KEY_A), json={"steps": x[:2].tolist()})
        assert got.status_code == 200, got.text
        assert c.delete(f"/v1/sessions/{sid}", headers=auth(KEY_A)).status_code == 204
        assert r.delete(f"psn:s:{sid}", f"psn:owner:{sid}", f"psn:lease:{sid}") >= 2  # as if its day had passed
        got = c.get(f"/v1/sessions/{sid}", headers=auth(KEY_A))
        assert got.status_code == 410 and got.json()["error"]["code"] == "session_closed", got.text
        got = c.post(f"/v1/sessions/{sid}/steps", headers=auth(KEY_A), json={"steps": x[2:3].tolist()})
        assert got.status_code == 410 and got.json()["error"]["code"] == "session_closed", got.text
        for req in (c.get(f"/v1/sessions/{sid}", headers=auth(KEY_B)),
                    c.post(f"/v1/sessions/{sid}/steps", headers=auth(KEY_B), json={"steps": x[2:3].tolist()})):
            assert req.status_code == 404 and req.json()["error"]["code"] == "session_not_found", req.text


def test_behind_haproxy_a_session_stays_on_one_replica_and_survives_a_replica_kill(cluster, ref: Reference,
                                                                                     tmp_path) -> None:
    a, b = cluster(2)
    port = free_port()
    proxy = start_haproxy(port, a, b)
    try:
        models = ("sliding", "masked", "conv")
        clients = [Client(f"127.0.0.1:{port}", models[i % 3], ref.sequence(models[i % 3], T_ALL, seed=80 + i),
                          ws=i % 2 == 1) for i in range(13)]  # 7 over HTTP: an odd count, so no
        # other balancing (round robin) could keep each session on one replica by chance
        for _ in range(4):  # 8 steps each, 2 a request, all through the proxy
            for c in clients:
                assert c.send(2)
        # opened round robin, then every request of a session hashed to one replica: at most one move each
        assert adopted(a) + adopted(b) <= len(clients)
        before = adopted(a) + adopted(b)
        for _ in range(2):
            for c in clients:
                assert c.send(2)
        assert adopted(a) + adopted(b) == before  # no session moved while the replica set stayed the same
        assert a.proc is not None
        for p in [*_children(a.proc.pid), a.proc.pid]:  # replica A dies
            os.kill(p, signal.SIGKILL)
        a.proc.wait()
        deadline = time.monotonic() + 60
        while any(len(c.outputs) < T_ALL for c in clients):
            assert time.monotonic() < deadline, [len(c.outputs) for c in clients]
            for c in clients:
                if len(c.outputs) < T_ALL and not c.send(3):
                    time.sleep(0.05)
        for c in clients:
            assert_outputs(c.outputs, ref.outputs(c.model, c.x))
    finally:
        proxy.kill()
        proxy.wait()


def test_behind_haproxy_an_oip_sequence_stays_on_one_replica(cluster, ref: Reference) -> None:
    """An Open Inference Protocol sequence names itself only in the body: the proxy reads its sequence_id
    (JSON, and the JSON header before binary tensor data), so every request of a sequence reaches one
    replica. Misrouted, a sequence would move (a takeover) and its old replica would refuse it (409)."""
    tritonclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is a dev dependency")
    import numpy as np

    a, b = cluster(2)
    port = free_port()
    proxy = start_haproxy(port, a, b)
    try:
        xs = {s: ref.sequence("sliding", 12, seed=300 + s).numpy().astype(np.float32) for s in range(7)}
        ids = {s: s + 1 if s % 2 else f"seq-{s}" for s in xs}  # integer and string ids
        got: dict[int, list] = {s: [] for s in xs}
        for k in range(4):
            for s, x in xs.items():
                c = tritonclient.InferenceServerClient(url=f"127.0.0.1:{port}")  # a new connection each time
                inp = tritonclient.InferInput("steps", [1, 3, *x.shape[1:]], "FP32")
                inp.set_data_from_numpy(x[None, 3 * k:3 * k + 3], binary_data=s % 3 != 0)
                r = c.infer("sliding", [inp], sequence_id=ids[s], sequence_start=k == 0, sequence_end=k == 3,
                            outputs=[tritonclient.InferRequestedOutput(n, binary_data=s % 2 == 0)
                                     for n in ("spikes", "scores", "predicted")])
                got[s] += [{"spikes": sp, "scores": sc, "predicted": p} for sp, sc, p in zip(
                    *(r.as_numpy(n)[0].tolist() for n in ("spikes", "scores", "predicted")), strict=True)]
                c.close()
        assert adopted(a) + adopted(b) == 0  # no sequence ever moved
        opened = [adopted(r, "psn_sessions_opened_total") for r in (a, b)]
        assert sum(opened) == len(xs) and min(opened) > 0, opened  # opened where their ids hash: both replicas
        for s, x in xs.items():
            assert_outputs([{"index": t, **o} for t, o in enumerate(got[s])],
                           ref.outputs("sliding", torch.from_numpy(x).double()), rel=1e-5, abs=1e-5)
        # a client may key any request itself with x-session-id: six opens with one key land on one replica
        # (without a key they go round robin)
        for _ in range(6):
            r = httpx.post(f"http://127.0.0.1:{port}/v1/sessions", json={"model": "sliding"},
                           headers={"x-session-id": "my-key", "connection": "close"}, timeout=20)
            assert r.status_code == 201, r.text
        more = sorted(adopted(r, "psn_sessions_opened_total") - n for r, n in zip((a, b), opened, strict=True))
        assert more == [0, 6], more
    finally:
        proxy.kill()
        proxy.wait()


def test_an_oip_sequence_moves_like_a_session_and_its_old_replica_says_send_it_again(cluster, ref: Reference) -> None:
    """An OIP sequence asked for on another replica is taken over there with the same outputs; its old
    replica refuses the next request with 409 in OIP's own words (no ``start``: just send it again)."""
    a, b = cluster(2)
    x = ref.sequence("sliding", 6, seed=41).float()
    expected = ref.outputs("sliding", x.double())

    def infer(srv: Server, t: int) -> httpx.Response:
        return httpx.post(f"{srv.url}/v2/models/sliding/infer", json=oip_sequence(x[t:t + 2], 9, sequence_start=t == 0),
                          timeout=20)

    outs = [infer(a, 0), infer(b, 2)]  # opened on A, continued on B: B takes it over
    assert [r.status_code for r in outs] == [200, 200], [r.text for r in outs]
    assert adopted(b) == 1
    moved = infer(a, 4)
    assert moved.status_code == 409, moved.text
    assert "moved to another replica" in moved.json()["error"] and "send it again" in moved.json()["error"]
    outs.append(infer(b, 4))
    spikes = [row for r in outs for row in next(o for o in r.json()["outputs"] if o["name"] == "spikes")["data"]]
    assert spikes == [v for step in expected[0] for v in step]  # spikes of the 6 steps, each applied once


def test_an_oip_sequence_started_again_stays_on_its_replica_and_its_record_starts_over(cluster,
                                                                                      ref: Reference) -> None:
    """sequence_start on a live sequence ends its old session and opens one of the same id in one engine
    turn: the new session keeps its lease (no 409, no take-over by the replica itself), and another
    replica that takes it over later replays only the new run."""
    a, b = cluster(2)
    x = ref.sequence("sliding", 6, seed=43).float()
    expected = ref.outputs("sliding", x.double())

    def infer(srv: Server, t: int, start: bool) -> httpx.Response:
        body = oip_sequence(x[t:t + 2], 11, ("scores",), sequence_start=start)
        return httpx.post(f"{srv.url}/v2/models/sliding/infer", json=body, timeout=20)

    assert infer(a, 4, True).status_code == 200  # a first run on other inputs, then started over
    outs = [infer(a, 0, True), infer(a, 2, False)]
    assert [r.status_code for r in outs] == [200, 200], [r.text for r in outs]
    assert adopted(a) == 0  # A never lost the sequence it serves
    outs.append(infer(b, 4, False))  # B takes it over: a replay of the new run only
    assert outs[-1].status_code == 200, outs[-1].text
    assert adopted(b) == 1
    scores = [v for r in outs for v in r.json()["outputs"][0]["data"]]
    assert scores == pytest.approx([v for step in expected[1] for v in step], rel=1e-5, abs=1e-6)
    assert httpx.get(f"{b.url}/v1/sessions/oip::sliding:11", timeout=20).json()["steps_seen"] == 6


def test_records_of_a_session_opened_again_in_the_same_write_are_not_refused(tmp_path) -> None:
    """One engine turn's write may hold records of a session another replica has since claimed (refused)
    and then the open of a new session of that id (an OIP sequence started again): the new one is this
    replica's, not refused; each record is fenced by the token it was written under."""
    from service.core.cluster import ClusterStore

    proc, port = redis_server(tmp_path)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        a, b = ClusterStore(url, "A"), ClusterStore(url, "B")
        assert (a.shared_tag("ta"), b.shared_tag("tb"), a.shared_tag("tc")) == ("ta", "ta", "ta")  # the first sets it
        a.add("o", "s", b"open")
        assert a.flush() == set()
        assert b.claim("s") == b"open"  # B takes it over; A does not know yet
        a.add("a", "s", b"steps")  # refused: B holds the lease
        a.add("o", "s", b"open again")  # the sequence started again on A: A's again
        assert a.flush() == set() and a.holds("s") and not b.holds("s")
        a.add("a", "s", b"more")
        a.add("e", "s", b"end")
        a.add("o", "s", b"third run")  # ended and opened in one write: the new lease stays
        assert a.flush() == set() and a.holds("s")
        assert a.r.lrange("psn:s:s", 0, -1) == [b"third run"]
        b.add("a", "s", b"late")
        assert b.flush() == {"s"}
        b.add("a", "s", b"later")  # not B's any more: nothing more is written or refused
        assert b.flush() == set() and a.r.lrange("psn:s:s", 0, -1) == [b"third run"]
        assert b.claim("never") is None
        b.add("a", "never", b"x")  # a session with no records was not taken: none of its writes go out
        assert b.flush() == set() and not b.r.exists("psn:s:never")
        assert b.claim_many(["never", "s"]) == [None, b"third run"]
        b.add("a", "never", b"x")
        b.add("e", "s", b"end")  # the end record frees the lease: nobody holds an ended session
        assert b.flush() == set() and not b.r.exists("psn:lease:s") and not a.holds("s")
    finally:
        proc.kill()
        proc.wait()


def answers(core, requests: list[list]) -> dict[int, list]:
    """``requests`` handled by an engine core in one turn, its log flushed: request id -> [status, body]."""
    for req in requests:
        core.handle(b"f", req)
    core.step()
    core.flush_log()
    return {rid: [status, body] for rid, status, body in core.take_outbox().get(b"f", [])}


def test_a_claim_by_another_owner_moves_nothing_and_one_batch_grants_the_sessions_own(tmp_path) -> None:
    """A claim names the owner asking: another owner's claim of a session is answered as for one with no
    records and changes nothing (lease, TTLs); in one batch that asks for a session for several owners, its own
    owner's claim is granted wherever it comes. A log written before the owner key existed is claimed by any
    owner (the engine core compares the owner after) until this version writes one of its records."""
    from service.core.cluster import ClusterStore

    proc, port = redis_server(tmp_path)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        a, b = ClusterStore(url, "A"), ClusterStore(url, "B")
        r = a.r
        a.add("o", "s", b"open", "alice")
        assert a.flush() == set() and r.get("psn:owner:s") == b"alice"
        lease = r.get("psn:lease:s")
        r.pexpire("psn:lease:s", 5000)
        assert b.claim("s", "mallory") is None and b.claim("s") is None  # "": no key is not every key
        assert b.claim_many(["s", "s"], ["mallory", ""]) == [None, None]
        assert r.get("psn:lease:s") == lease and r.pttl("psn:lease:s") <= 5000 and a.holds("s") and not b.holds("s")
        assert b.claim_many(["s", "s", "never"], ["mallory", "alice", "alice"]) == [None, b"open", None]
        assert b.holds("s") and not a.holds("s")  # B's token is the granted claim's
        b.add("a", "s", b"steps", "alice")
        assert b.flush() == set() and r.lrange("psn:s:s", 0, -1) == [b"open", b"steps"]
        r.delete("psn:owner:s")  # as written before the owner key
        assert a.claim("s", "mallory") == b"opensteps" and a.holds("s")
        a.add("a", "s", b"more", "alice")  # the first record this version writes puts the key back
        assert a.flush() == set() and r.get("psn:owner:s") == b"alice" and b.claim("s", "mallory") is None
    finally:
        proc.kill()
        proc.wait()

def test_another_owners_request_in_the_turn_that_claims_a_session_is_answered_as_for_no_session(
        model_dir: Path, tmp_path: Path) -> None:
    """One engine turn may hold step requests of two keys for the same session that the replica does not hold:
    the owner's claim is granted, the other key's refused. The other key's request was then answered with
    whatever the owner's claim led to (410 session_closed for an ended session, 410 session_lost, 429 with
    the model's name when no slot was free), telling it the session exists: it is answered 404 like an id that
    never existed, as it is in a turn of its own."""
    import numpy as np

    from service.config import Settings
    from service.core.proc import build_core
    from service.core.sessions import make_id
    from service.ipc import OK

    proc, port = redis_server(tmp_path)
    try:
        settings = Settings(model_dir=model_dir, cluster=True, state_url=f"redis://127.0.0.1:{port}/0", warmup=False)
        a, b = build_core(settings.model_copy(update={"replica_id": "A"})), \
            build_core(settings.model_copy(update={"replica_id": "B"}))

        sid = answers(a, [[1, "open", "sliding", False, None, "alice"]])[1][1]["session_id"]
        missing = make_id(id_tag(sid) or "")
        x = np.zeros((1, 3), np.float32).tobytes()
        assert answers(a, [[2, "steps", sid, -1, 1, x, "alice"]])[2][0] == OK
        assert answers(a, [[3, "close", sid, "alice"]])[3][0] == OK
        got = answers(b, [[4, "steps", sid, -1, 1, x, "mallory"], [5, "steps", sid, -1, 1, x, "alice"],
                          [6, "steps", missing, -1, 1, x, "mallory"]])
        assert got[5][0] == 410 and got[5][1][0] == "session_closed", got  # its owner is told
        assert got[4][0] == 404 and got[4][1] == [c.replace(missing, sid) if isinstance(c, str) else c
                                                  for c in got[6][1]], got
    finally:
        proc.kill()
        proc.wait()


def test_a_turns_claims_grant_an_unstepped_session_to_its_owner_leave_a_draining_replica_alone_and_keep_410s(
        model_dir: Path, tmp_path: Path) -> None:
    """Cases of the engine turn's claims (``adopt_pending``), two real engine cores on a real redis-server: a
    session opened on A and asked for on B by its owner before its first step is taken over (its open record
    wrote its owner key), and so is one whose log A has rewritten as a snapshot (that record too), and one whose
    owner's request comes before another key's in the turn; a step request queued on B when B begins to drain is
    answered shutting_down and does not take the session from A (whose next step would be 409 session_moved); an
    id A closed, whose shared log has expired (the ended TTL), is still answered 410 by A while A remembers it,
    as a read of it is."""
    import numpy as np

    from service.config import Settings
    from service.core.proc import build_core
    from service.ipc import OK

    proc, port = redis_server(tmp_path)
    try:
        settings = Settings(model_dir=model_dir, cluster=True, state_url=f"redis://127.0.0.1:{port}/0", warmup=False,
                            cluster_session_records=2)
        a, b = build_core(settings.model_copy(update={"replica_id": "A"})), \
            build_core(settings.model_copy(update={"replica_id": "B"}))
        assert a.cluster is not None

        def open_(owner: str) -> str:
            return answers(a, [[1, "open", "sliding", False, None, owner]])[1][1]["session_id"]

        x = np.zeros((1, 3), np.float32).tobytes()
        sid = open_("alice")
        assert answers(b, [[2, "steps", sid, -1, 1, x, "mallory"]])[2][0] == 404
        assert answers(b, [[3, "steps", sid, -1, 1, x, "alice"]])[3][0] == OK  # B took it over
        assert b.cluster is not None and b.cluster.holds(sid) and not a.cluster.holds(sid)

        sid = open_("alice")
        for rid in range(10, 14):  # past cluster_session_records: the log is rewritten as one snapshot record
            assert answers(a, [[rid, "steps", sid, -1, 1, x, "alice"]])[rid][0] == OK
        a.flush_log()  # the rewrite the last turn asked for: the last record written
        assert a.cluster.r.llen(f"psn:s:{sid}") == 1
        got = answers(b, [[14, "steps", sid, -1, 1, x, "alice"], [15, "steps", sid, -1, 1, x, "mallory"]])
        assert got[14][0] == OK and got[15][0] == 404, got  # the owner's claim first in the turn
        assert b.cluster.holds(sid) and b.get(b"f", 16, sid, owner="alice")["steps_seen"] == 5

        sid = open_("alice")
        assert answers(a, [[4, "steps", sid, -1, 1, x, "alice"]])[4][0] == OK
        b.handle(b"f", [5, "steps", sid, -1, 1, x, "alice"])  # queued for this turn's claim
        b.begin_drain()
        b.step()
        got = {rid: [status, body] for rid, status, body in b.take_outbox().get(b"f", [])}
        assert got[5][0] == 503 and got[5][1][0] == "shutting_down", got
        assert a.cluster.holds(sid) and answers(a, [[6, "steps", sid, -1, 1, x, "alice"]])[6][0] == OK

        sid = open_("")
        assert answers(a, [[7, "close", sid, ""]])[7][0] == OK
        a.cluster.r.delete(f"psn:s:{sid}", f"psn:owner:{sid}")  # the ended TTL has passed
        got = answers(a, [[8, "get", sid, False, ""], [9, "steps", sid, -1, 1, x, ""]])
        assert got[8][0] == got[9][0] == 410 and got[8][1][0] == got[9][1][0] == "session_closed", got
    finally:
        proc.kill()
        proc.wait()


def test_reading_an_ended_session_on_another_replica_keeps_it_for_the_ended_ttl(tmp_path) -> None:
    """An ended session's log and owner key stay in Redis for the ended TTL (a day), so every replica answers
    410 for it meanwhile (docs/cluster.md). Its owner asking a replica that does not hold it claims it to read
    its log, and the claim set the log's and the owner key's TTL to the live one (ten minutes by default): one
    read and the id answered 404, as never opened, ten minutes later. A claim now renews, never shortens."""
    from service.core.cluster import ClusterStore

    proc, port = redis_server(tmp_path)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        a, b = (ClusterStore(url, name, live_ttl_s=100, ended_ttl_s=1000) for name in "AB")
        r = a.r
        a.add("o", "s", b"open", "alice")
        a.add("e", "s", b"end")
        assert a.flush() == set()
        assert b.claim("s", "alice") == b"openend"  # its owner asks replica B: B reads the end record
        ended = range(990_000, 1_000_001)  # ms
        assert r.pttl("psn:s:s") in ended and r.pttl("psn:owner:s") in ended, (r.pttl("psn:s:s"),
                                                                                 r.pttl("psn:owner:s"))
        for key in ("psn:s:s", "psn:owner:s"):
            r.pexpire(key, 5000)  # near its end: a claim still renews it to the live TTL, as before
        assert b.claim("s", "alice") == b"openend"
        assert r.pttl("psn:s:s") in range(90_000, 100_001) and r.pttl("psn:owner:s") in range(90_000, 100_001)
    finally:
        proc.kill()
        proc.wait()

def test_a_replicas_session_records_outlive_its_idle_timeout_in_redis(model_dir: Path, tmp_path: Path) -> None:
    """The engine core's cluster store (build_core with PSN_CLUSTER) keeps a live session's records in Redis at
    least twice PSN_IDLE_TIMEOUT_S and at least ten minutes, so no session still live on a replica loses them."""
    from service.config import Settings
    from service.core.proc import build_core

    proc, port = redis_server(tmp_path)
    try:
        for idle_s, at_least_s in ((1000.0, 2000), (10.0, 600)):
            core = build_core(Settings(model_dir=model_dir, cluster=True, state_url=f"redis://127.0.0.1:{port}/0",
                                       idle_timeout_s=idle_s, warmup=False))
            assert core.cluster is not None
            core.cluster.add("o", f"s{idle_s}", b"open")
            assert core.cluster.flush() == set()
            ttl_ms = core.cluster.r.pttl(f"psn:s:s{idle_s}")
            assert ttl_ms > at_least_s * 1000 - 60_000, (idle_s, ttl_ms)  # less a minute for this test
    finally:
        proc.kill()
        proc.wait()


def test_a_websocket_routed_by_session_id_attaches_only_to_that_session(server: Server) -> None:
    """/v1/stream?session_id=X is how a proxy routes a WebSocket (the attach message is out of its sight),
    so attaching to another session on that connection is refused: it would run where X's replica is."""
    with httpx.Client(base_url=server.url, timeout=20) as c:
        a, b = (c.post("/v1/sessions", json={"model": "sliding"}).json()["session_id"] for _ in range(2))
    with connect(f"{server.ws_url}?session_id={a}", open_timeout=10) as ws:
        ws.send(json.dumps({"type": "attach", "session_id": b}))
        err = json.loads(ws.recv(timeout=10))
        assert err["type"] == "error" and err["error"]["code"] == "invalid_input", err
        assert err["error"]["field"] == "session_id"
        ws.send(json.dumps({"type": "attach", "session_id": a}))
        assert json.loads(ws.recv(timeout=10))["type"] == "attached"


def test_the_ray_router_keys_on_the_session_id_in_the_url() -> None:
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e '.[cluster]')")
    from service.ray_router import oip_sequence_key, session_key

    assert session_key("/v1/sessions/abc/steps") == "abc"
    assert session_key("/v1/sessions/abc") == "abc"
    assert session_key("/v1/stream", b"session_id=abc&x=1") == "abc"
    assert session_key("/v1/sessions", b"") is None  # opening one: spread over the replicas
    assert session_key("/v1/stream", b"") is None
    assert session_key("/v1/models") is None
    # OIP sequences: the body's sequence_id (JSON; the binary extension's JSON header), keyed with the model
    body = json.dumps({"inputs": [], "parameters": {"sequence_id": 7, "sequence_start": True}}).encode()
    assert oip_sequence_key("m", body) == "oip:m:7"
    assert oip_sequence_key("m", body + b"\x00\xff{", str(len(body))) == "oip:m:7"
    assert oip_sequence_key("m", json.dumps({"parameters": {"sequence_id": "ab"}}).encode()) == "oip:m:ab"
    for params in ({}, {"sequence_id": 0}, {"sequence_id": ""}, {"sequence_id": True}, {"sequence_id": [1]}):
        assert oip_sequence_key("m", json.dumps({"parameters": params}).encode()) is None  # any replica
    assert oip_sequence_key("m", b"{not json") is None
    # a JSON body that is not an object, or a header length that is not a number: any replica, no error
    for bad in (b"[1]", b'"text"', b"7"):
        assert oip_sequence_key("m", bad) is None
    for length in ("", "x", "-1"):  # not a length: the whole body is the JSON
        assert oip_sequence_key("m", body, length) == "oip:m:7"


def test_the_ray_router_keys_a_request_from_the_proxy_on_the_session_its_url_names() -> None:
    """SessionRouter's key for a request as Ray's HTTP proxy hands it over (a pickled StreamingHTTPRequest): the
    session in the URL, unless the client sent x-session-id itself; a request that names none keeps Ray's key
    (the request id: spread over the replicas)."""
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e '.[cluster]')")
    import pickle
    from types import SimpleNamespace

    from ray.serve._private.common import StreamingHTTPRequest

    from service.ray_router import SessionRouter

    def key(path: str, query: bytes = b"", header: str = "") -> str | None:
        request = StreamingHTTPRequest({"type": "http", "path": path, "query_string": query}, proxy_actor_name="p")
        pending = SimpleNamespace(args=[pickle.dumps(request)],
                                  metadata=SimpleNamespace(session_id=header, internal_request_id="request-1"))
        return object.__new__(SessionRouter)._routing_key(pending)  # it reads the request alone

    assert key("/v1/sessions/abc/steps") == key("/v1/sessions/abc") == "abc"
    assert key("/v1/stream", b"session_id=abc&x=1") == "abc"
    assert key("/v1/sessions/abc", header="chosen") == key("/v1/stream", b"session_id=abc", "chosen") == "chosen"
    for path, query in (("/v1/sessions", b""), ("/v1/sessions/", b""), ("/v1/stream", b""),
                        ("/v1/models", b"session_id=abc"), ("/metrics", b"")):
        assert key(path, query) == "request-1", (path, query)
    assert object.__new__(SessionRouter)._routing_key(None) is None


def test_a_ray_replica_whose_service_is_down_answers_503_in_each_protocols_error_shape() -> None:
    """The replica's relay to its own service (refused connection here): 503 with Retry-After, the /v1
    error object on /v1, the protocol's ``{"error": "message"}`` on /v2 (what tritonclient reads)."""
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e '.[cluster]')")
    import asyncio
    from types import SimpleNamespace

    from service.ray import Replica

    # the replica's own relay method, on just the state it reads (no Serve, no service started)
    relay = SimpleNamespace(http=None, base=f"127.0.0.1:{free_port()}", replica_id="r1")

    async def ask(path: bytes) -> tuple[int, dict[str, str], bytes]:
        try:
            return await Replica.func_or_class.forward(relay, "POST", path, b"", [("content-type", "application/json")],
                                                       b"{}")
        finally:
            await relay.http.close()
            relay.http = None

    for path, shape in ((b"/v1/sessions", dict), (b"/v2/models/m/infer", str)):
        status, headers, body = asyncio.run(ask(path))
        error = json.loads(body)["error"]
        assert status == 503 and headers["retry-after"] == "1" and isinstance(error, shape), body
        assert "r1" in (error if shape is str else error["message"]), body
        if shape is dict:
            assert error["code"] == "engine_unavailable"


@pytest.mark.slow
def test_cluster_smoke() -> None:
    """scripts/cluster-smoke: Ray Serve, 2 replicas, one killed with SIGKILL mid-stream (about a minute)."""
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e '.[cluster]')")
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    out = subprocess.run([str(ROOT / "scripts" / "cluster-smoke")], capture_output=True, text=True, timeout=600)
    lines = out.stdout.strip().splitlines()
    assert lines and lines[-1] == "PASS", out.stdout[-4000:] + out.stderr[-4000:]


def start_haproxy(port: int, a: Server, b: Server) -> subprocess.Popen:
    """deploy/haproxy.cfg on ``port`` in front of replicas ``a`` and ``b``, once it answers /readyz (from a
    replica that is up)."""
    exe = shutil.which("haproxy")
    if exe is None:
        pytest.skip("haproxy is not installed (Debian: apt-get install haproxy)")
    env = {**os.environ, "PSN_PROXY_BIND": f"127.0.0.1:{port}", "PSN_REPLICA_1": f"127.0.0.1:{a.port}",
           "PSN_REPLICA_2": f"127.0.0.1:{b.port}"}
    proxy = subprocess.Popen([exe, "-db", "-f", str(ROOT / "deploy" / "haproxy.cfg")], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proxy
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or proxy.poll() is not None:
            proxy.kill()
            proxy.wait()
            raise AssertionError("haproxy did not come up")
        time.sleep(0.1)


def test_when_a_replica_is_added_moved_sessions_are_refused_by_the_old_one_and_retried_on_the_new(
        serve, model_dir, ref: Reference, tmp_path) -> None:
    """Replica B joins behind the proxy: sessions hashing to B move there on their next request by id; a
    WebSocket still pinned to A gets 409 session_moved for them (never applied on A), and its client's
    reconnect lands on B, which continues them with the same outputs."""
    proc, rport = redis_server(tmp_path)
    try:
        settings = dict(cluster=1, state_url=f"redis://127.0.0.1:{rport}/0")
        a = serve(replica_id="A", **settings)
        b = Server({**DEFAULTS, "model_dir": model_dir, "replica_id": "B", **settings}, tmp_path)  # not up yet
        port = free_port()
        proxy = start_haproxy(port, a, b)
        base = f"127.0.0.1:{port}"
        try:
            clients = [Client(base, "sliding", ref.sequence("sliding", T, seed=200 + i), ws=True) for i in range(16)]
            for c in clients:  # all on A: B is down
                assert c.send(4)
            b.start()
            try:
                deadline = time.monotonic() + 20
                with httpx.Client(base_url=f"http://{base}", timeout=10, headers={"connection": "close"}) as h:
                    while adopted(b) == 0:  # once the proxy sees B, reads by id move B's share of sessions there
                        assert time.monotonic() < deadline, "the proxy never sent a session to B"
                        for c in clients:
                            assert h.get(f"/v1/sessions/{c.sid}").json()["steps_seen"] == 4
                        time.sleep(0.3)
                moved = adopted(b)
                codes = []
                for c in clients:  # the WebSockets are still pinned to A
                    c.ws.send(json.dumps({"type": "steps", "start": 4, "steps": c.x[4:6].tolist()}))
                    msg = json.loads(c.ws.recv(timeout=20))
                    if msg["type"] == "steps":
                        c.outputs += msg["outputs"]
                        codes.append("ok")
                    else:
                        codes.append(msg["error"]["code"])
                        assert msg["error"]["code"] == "session_moved", msg
                        c.ws.close()
                        c.ws = None  # the client reconnects: ?session_id= routes it to B
                assert codes.count("session_moved") == moved > 0, codes
                for c in clients:
                    while len(c.outputs) < T:
                        assert c.send(5)
                    assert_outputs(c.outputs, ref.outputs("sliding", c.x))
                assert adopted(b) == moved  # the retries found their sessions on B: nothing moved again
            finally:
                b.stop()
        finally:
            proxy.kill()
            proxy.wait()
    finally:
        proc.kill()
        proc.wait()


def test_a_session_whose_shared_log_is_damaged_midway_is_lost_not_rolled_back(cluster, ref: Reference) -> None:
    """A byte flipped in the middle of a session's records in Redis: the replica that takes it over read up
    to the damage and continued the session from that older step (answering 200); it is 410 session_lost."""
    import redis

    a, b = cluster(2)
    x = ref.sequence("sliding", T, seed=9)
    with httpx.Client(base_url=a.url, timeout=20) as ca, httpx.Client(base_url=b.url, timeout=20) as cb:
        sid = ca.post("/v1/sessions", json={"model": "sliding"}).json()["session_id"]
        for start in range(0, 12, 3):
            assert steps(ca, sid, x, start, 3).status_code == 200
        r = redis.Redis.from_url(a.settings["state_url"])
        key = f"psn:s:{sid}"
        records = r.lrange(key, 0, -1)
        middle = bytearray(records[len(records) // 2])
        middle[len(middle) // 2] ^= 0xFF
        r.lset(key, len(records) // 2, bytes(middle))
        got = cb.get(f"/v1/sessions/{sid}")
        assert got.status_code == 410 and got.json()["error"]["code"] == "session_lost", got.text
    assert "is corrupt" in b.log()


def test_redis_gone_under_a_replica_is_logged_once(cluster, ref: Reference, tmp_path) -> None:
    """Redis dies under a replica serving its sessions: serving goes on (as for the single-service store)
    and the failure is one ERROR line, not one with a traceback after every request (the in-a-row count
    was reset by every engine turn that had nothing to write)."""


    (a,) = cluster(1)
    x = ref.sequence("sliding", T, seed=11)
    with httpx.Client(base_url=a.url, timeout=20) as ca:
        sid = ca.post("/v1/sessions", json={"model": "sliding"}).json()["session_id"]
        assert steps(ca, sid, x, 0, 3).status_code == 200
        shut_down_redis(a)
        for start in range(3, 15, 3):
            assert steps(ca, sid, x, start, 3).status_code == 200
            time.sleep(0.05)  # turns with nothing to write in between
    assert a.log().count("cluster: writing to Redis failed") == 1, a.log()
    assert "Traceback" not in a.log()



def test_redis_gone_when_a_request_asks_for_a_session_held_nowhere_here_kills_nothing(cluster, ref: Reference) -> None:
    """With Redis gone, an OIP request of a sequence this replica does not hold (any client's: one never started
    is enough) is claimed in the engine turn (``adopt_pending``); the claim's error went up through the engine
    loop and killed the engine core, which then could not start again while Redis was down, so every session of
    the replica was refused. It is answered 503 ``session_store_unavailable`` with Retry-After, as a read of such a
    session is (once 500 ``internal``, as for a bug), and the replica's own sessions are served on."""


    (a,) = cluster(1)
    x = ref.sequence("sliding", T, seed=11)
    with httpx.Client(base_url=a.url, timeout=20) as ca:
        sid = ca.post("/v1/sessions", json={"model": "sliding"}).json()["session_id"]
        assert steps(ca, sid, x, 0, 3).status_code == 200
        shut_down_redis(a)
        r = ca.post("/v2/models/sliding/infer", json=oip_sequence(x[:2], 77))  # a sequence never started
        assert r.status_code == 503 and r.headers["Retry-After"] == "1", r.text
        assert "the shared session store (PSN_STATE_URL) did not answer (ConnectionError)" in r.json()["error"], r.text
        r = ca.get("/v1/sessions/" + "x" * 24)  # a read claims too
        assert r.status_code == 503 and r.json()["error"]["code"] == "session_store_unavailable", r.text
        assert r.json()["error"]["field"] == "session_id", r.text  # the id it could not take over
        assert r.headers["Retry-After"] == "1"
        for start in range(3, 9, 3):
            assert steps(ca, sid, x, start, 3).status_code == 200
    assert "exited with" not in a.log(), a.log()
    assert a.log().count("cluster: claiming 1 session(s) from Redis failed: ConnectionError") == 1, a.log()
    assert "Traceback" not in a.log()  # a store failing, not a bug: one line

# ----- found by a mutation sweep of cluster.py (2026-12-07)


def test_leases_and_logs_live_for_their_ttls_and_each_write_renews_them(tmp_path) -> None:
    """A live session's lease, log and owner key expire ``PSN_CLUSTER`` live TTL after its last write or claim
    (not after its open: an active session must never lose them); an ended session's log and owner key stay for
    the ended TTL, so its id answers 410 there (to its owner); a rewrite replaces the log and keeps its TTL."""
    from service.core.cluster import ClusterStore

    proc, port = redis_server(tmp_path)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        a, b = ClusterStore(url, "A", live_ttl_s=100, ended_ttl_s=1000), ClusterStore(url, "B", live_ttl_s=100,
                                                                                      ended_ttl_s=1000)
        r = a.r
        live = range(90_000, 100_001)  # ms

        def ttls() -> tuple[int, int, int]:
            return r.pttl("psn:lease:s"), r.pttl("psn:s:s"), r.pttl("psn:owner:s")

        def run_down() -> None:  # as if most of the TTL had passed
            for key in ("psn:lease:s", "psn:s:s", "psn:owner:s"):
                r.pexpire(key, 5000)

        a.add("o", "s", b"open")
        assert a.flush() == set() and all(t in live for t in ttls()), ttls()
        run_down()
        a.add("a", "s", b"steps")
        assert a.flush() == set() and all(t in live for t in ttls()), ttls()
        run_down()
        a.add("r", "s", b"snapshot")
        assert a.flush() == set() and r.lrange("psn:s:s", 0, -1) == [b"snapshot"] and ttls()[1] in live, ttls()
        assert ttls()[2] in live, ttls()
        run_down()
        assert b.claim("s") == b"snapshot" and all(t in live for t in ttls()), ttls()
        run_down()
        assert b.claim_many(["s"]) == [b"snapshot"] and all(t in live for t in ttls()), ttls()
        b.add("e", "s", b"end")
        assert b.flush() == set() and r.pttl("psn:s:s") in range(990_000, 1_000_001), ttls()
        assert r.pttl("psn:owner:s") in range(990_000, 1_000_001), ttls()
    finally:
        proc.kill()
        proc.wait()


def test_redis_gone_when_a_step_gap_or_a_retry_checks_the_lease_kills_nothing(cluster, ref: Reference) -> None:
    """A step_gap or retry_too_old refusal, and a retry answered wholly from the retry window, ask Redis whether
    another replica has claimed the session since (the gap may be another replica's steps). With Redis gone, the
    question's error went up through the engine loop and killed the engine core, which then could not start
    while Redis was down: every session of the replica was refused (a read's check: 500 internal). The replica
    now serves its own session on, as it applies its steps while the store is down: each is answered as
    without replicas."""


    (a,) = cluster(1, retry_window=2)
    x = ref.sequence("sliding", T, seed=12)
    expected = ref.outputs("sliding", x)
    with httpx.Client(base_url=a.url, timeout=20) as ca:
        sid = ca.post("/v1/sessions", json={"model": "sliding"}).json()["session_id"]
        assert steps(ca, sid, x, 0, 6).status_code == 200
        shut_down_redis(a)
        r = ca.get(f"/v1/sessions/{sid}")  # a read checks the lease too (it was 500 internal)
        assert r.status_code == 200 and r.json()["steps_seen"] == 6, r.text
        for start, n, code in ((8, 1, "step_gap"), (1, 6, "retry_too_old")):
            r = steps(ca, sid, x, start, n)
            assert r.status_code == 409 and r.json()["error"]["code"] == code, r.text
        r = steps(ca, sid, x, 5, 1)  # a retry of step 5
        assert r.status_code == 200 and r.json()["replayed"] == 1, r.text
        outputs = r.json()["outputs"]
        for start in range(6, 12, 3):
            r = steps(ca, sid, x, start, 3)
            assert r.status_code == 200, r.text
            outputs += r.json()["outputs"]
        assert_outputs(outputs, expected, start=5)
    assert "exited with" not in a.log(), a.log()
    assert "Traceback" not in a.log()
