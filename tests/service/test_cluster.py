"""Replicas sharing sessions through Redis (issue 12, ``PSN_CLUSTER=1``): a replica asked about a session
another one holds takes it over with the same outputs; the old holder then refuses the session's steps
with 409 ``session_moved``; a replica killed with SIGKILL loses nothing. Real processes: two
``python -m service`` replicas and a real redis-server, no proxy (the tests choose the replica).
"""

from __future__ import annotations

import os
import signal
import subprocess

import httpx
import pytest

from tests.service.conftest import Reference, Server, assert_outputs
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


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]
