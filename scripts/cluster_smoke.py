"""The cluster check (run by scripts/cluster-smoke): 32 sessions stream the shipped models' reference
samples through psn-stream replicas while one replica is killed with SIGKILL; every session must finish
with the reference outputs, each step applied once. Last line: PASS or FAIL.

    python scripts/cluster_smoke.py ray                 # starts Ray Serve (2 replicas) + redis-server
    python scripts/cluster_smoke.py url HOST:PORT KILL  # a running cluster; KILL: a shell command that kills
                                                        # one replica (the compose variant uses docker kill)

Clients behave as docs/cluster.md tells them: half stream over HTTP (``POST /v1/sessions/{id}/steps``),
half over WebSocket (``/v1/stream?session_id={id}`` then attach); on any failure (connection lost, 503,
409 session_moved) they reconnect and re-send from their last acknowledged step with ``start``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

ROOT = Path(__file__).resolve().parents[1]
SESSIONS, CHUNK = 32, 4
RETRYABLE = (None, "engine_unavailable", "shutting_down", "not_ready", "session_moved", "internal")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def samples() -> list[tuple[str, list, list[float], int]]:
    """(model, steps, reference final scores, reference prediction) of every shipped reference sample."""
    out = []
    for ref_file in sorted((ROOT / "exported").glob("*/reference.json")):
        ref = json.loads(ref_file.read_text())
        x, B = ref["x"], len(ref["x"][0])
        lengths = ref.get("lengths") or [len(x)] * B
        for b in range(B):
            out.append((ref_file.parent.name, [x[t][b] for t in range(lengths[b])], ref["scores"][b],
                        ref["predictions"][b]))
    return out


class Client:
    """One session, streamed CHUNK steps a request, re-sent from the last acknowledged step on failure."""

    def __init__(self, base: str, i: int, sample: tuple[str, list, list[float], int]):
        self.base, self.ws_mode = base, i % 2 == 1
        self.model, self.x, self.ref_scores, self.ref_pred = sample
        self.http = httpx.Client(base_url=f"http://{base}", timeout=30)
        self.sid = ""
        while not self.sid:
            try:
                r = self.http.post("/v1/sessions", json={"model": self.model})
                self.sid = r.json().get("session_id", "") if r.status_code == 201 else ""
            except httpx.TransportError:
                time.sleep(0.2)
        self.outputs: list[dict] = []
        self.ws = None
        self.failures = 0
        self.last_ok = time.monotonic()
        self.stalls: list[float] = []  # seconds from a failure to the next acknowledged answer

    @property
    def done(self) -> bool:
        return len(self.outputs) >= len(self.x)

    def _drop_ws(self) -> None:
        if self.ws is not None:
            try:
                self.ws.close()
            except Exception:  # noqa: BLE001
                pass
        self.ws = None

    def send(self) -> bool:
        start = len(self.outputs)
        steps = self.x[start:start + CHUNK]
        body: dict = {}
        try:
            if self.ws_mode:
                if self.ws is None:
                    self.ws = connect(f"ws://{self.base}/v1/stream?session_id={self.sid}", open_timeout=10).__enter__()
                    self.ws.send(json.dumps({"type": "attach", "session_id": self.sid}))
                    body = json.loads(self.ws.recv(timeout=30))
                    if body.get("type") != "attached":
                        raise ConnectionError(body)
                self.ws.send(json.dumps({"type": "steps", "start": start, "steps": steps}))
                body = json.loads(self.ws.recv(timeout=30))
                ok = body.get("type") == "steps"
            else:
                r = self.http.post(f"/v1/sessions/{self.sid}/steps", json={"start": start, "steps": steps})
                body, ok = r.json(), r.status_code == 200
        except (httpx.TransportError, ConnectionClosed, OSError, TimeoutError, ConnectionError, ValueError):
            ok = False
        if not ok:
            err = body.get("error") if isinstance(body, dict) else None
            code = err.get("code") if isinstance(err, dict) else None
            if code not in RETRYABLE:
                raise AssertionError(f"session {self.sid}: unexpected answer {body}")
            self._drop_ws()
            self.failures += 1
            return False
        if body["start"] != start:
            raise AssertionError(f"session {self.sid}: asked from {start}, answered from {body['start']}")
        self.outputs += body["outputs"]
        now = time.monotonic()
        if self.failures and now - self.last_ok > 0.2:
            self.stalls.append(now - self.last_ok)
        self.last_ok = now
        return True


def drive(clients: list[Client], deadline: float) -> None:
    def work(mine: list[Client]) -> None:
        rng = random.Random(len(mine))
        while any(not c.done for c in mine) and time.monotonic() < deadline:
            for c in mine:
                if not c.done and not c.send():
                    time.sleep(0.05 + rng.random() * 0.05)

    threads = [threading.Thread(target=work, args=(clients[i::8],), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + 5)


def check(base: str, clients: list[Client]) -> list[str]:
    """What is wrong (nothing: PASS): reference outputs, and the same step outputs as an undisturbed run."""
    problems = []
    http = httpx.Client(base_url=f"http://{base}", timeout=30)
    for c in clients:
        T = len(c.x)
        if len(c.outputs) != T:
            problems.append(f"{c.sid} ({c.model}): {len(c.outputs)} of {T} steps acknowledged")
            continue
        last = c.outputs[-1]
        diff = max(abs(a - e) for a, e in zip(last["scores"], c.ref_scores, strict=True))
        if [o["index"] for o in c.outputs] != list(range(T)) or last["predicted"] != c.ref_pred or diff >= 1e-3:
            problems.append(f"{c.sid} ({c.model}): predicted {last['predicted']} (reference {c.ref_pred}), "
                            f"max |score - reference| {diff:.2e}")
        seen = http.get(f"/v1/sessions/{c.sid}").json().get("steps_seen")
        if seen != T:
            problems.append(f"{c.sid}: steps_seen {seen}, expected {T} (a step applied twice or lost)")
        # the same sample in the same chunks on a fresh session: every step's outputs must match exactly
        fresh = http.post("/v1/sessions", json={"model": c.model}).json()["session_id"]
        again = [o for t in range(0, T, CHUNK) for o in http.post(f"/v1/sessions/{fresh}/steps", json={
            "start": t, "steps": c.x[t:t + CHUNK]}).json()["outputs"]]
        if again != c.outputs:
            problems.append(f"{c.sid} ({c.model}): outputs differ from an undisturbed run of the same sample")
        http.delete(f"/v1/sessions/{fresh}")
    return problems


def oip_sequences(base: str, n: int = 8, chunk: int = 2) -> list[str]:
    """What is wrong with ``n`` Open Inference Protocol sequences (every other shipped sample) streamed
    ``chunk`` steps a request, interleaved, each request on a new connection: their id is only in the
    body, and the router must still keep each on one replica (a sequence that moved and came back would
    be refused by its old replica, 409). Before any replica dies: an OIP client has no ``start`` to
    re-send from, so every request must be answered, with the outputs /v1 gives the same steps."""
    seqs = [(f"smoke-{i}" if i % 2 else 1000 + i, s) for i, s in enumerate(samples()[::2][:n])]
    got: dict = {seq: [] for seq, _ in seqs}
    for t in range(0, max(len(s[1]) for _, s in seqs), chunk):
        for seq, (model, x, _, _) in seqs:
            if t >= len(x):
                continue
            steps = np.asarray(x[t:t + chunk], np.float32)
            body = {"inputs": [{"name": "steps", "datatype": "FP32", "shape": [1, *steps.shape],
                                "data": steps.ravel().tolist()}],
                    "parameters": {"sequence_id": seq, "sequence_start": t == 0, "sequence_end": t + chunk >= len(x)}}
            r = httpx.post(f"http://{base}/v2/models/{model}/infer", json=body, timeout=30)
            if r.status_code != 200:
                return [f"OIP sequence {seq!r}: request at step {t} answered {r.status_code} {r.text[:200]}"]
            out = {o["name"]: np.asarray(o["data"]).reshape(o["shape"])[0] for o in r.json()["outputs"]}
            got[seq] += zip(out["spikes"].tolist(), out["scores"].tolist(), out["predicted"].tolist(), strict=True)
    problems: list[str] = []
    with httpx.Client(base_url=f"http://{base}", timeout=30) as http:
        for seq, (model, x, _, _) in seqs:
            sid = http.post("/v1/sessions", json={"model": model}).json()["session_id"]
            v1 = http.post(f"/v1/sessions/{sid}/steps", json={
                "steps": np.asarray(x, np.float32).astype(float).tolist()}).json()["outputs"]
            http.delete(f"/v1/sessions/{sid}")
            for o, (spikes, scores, predicted) in zip(v1, got[seq], strict=True):
                if spikes != o["spikes"] or predicted != o["predicted"] or \
                        max(abs(a - b) for a, b in zip(scores, o["scores"], strict=True)) > 1e-5:
                    problems.append(f"OIP sequence {seq!r} ({model}): step {o['index']} differs from /v1")
                    break
    return problems


def descendants(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    kids = [int(p) for p in out]
    return kids + [d for k in kids for d in descendants(k)]


def wait_replicas(base: str, n: int, timeout: float) -> dict[str, dict]:
    """Ask /ray/replica until ``n`` replicas have answered; replica id -> its processes."""
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(seen)} of {n} replicas answered within {timeout:g} s")
        try:
            r = httpx.get(f"http://{base}/ray/replica", timeout=2)
            if r.status_code == 200:
                seen[r.json()["replica"]] = r.json()
                continue
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    return seen


def run(base: str, kill) -> bool:
    problems = oip_sequences(base)
    print(f"OIP sequences: {'every request answered, the same outputs as /v1' if not problems else 'FAILED'}")
    for p in problems:
        print("  " + p)
    clients = [Client(base, i, s) for i, s in zip(range(SESSIONS), samples() * 4, strict=False)]
    total = sum(len(c.x) for c in clients)
    killed_at: list[float] = []

    def killer() -> None:
        while sum(len(c.outputs) for c in clients) < total // 3:
            time.sleep(0.01)
        killed_at.append(time.monotonic())
        kill()

    k = threading.Thread(target=killer, daemon=True)
    k.start()
    t0 = time.monotonic()
    drive(clients, t0 + 240)
    elapsed = time.monotonic() - t0
    problems += check(base, clients) if killed_at else ["the replica was never killed"]
    stalls = [s for c in clients for s in c.stalls]
    failed = sum(c.failures > 0 for c in clients)
    print(f"{SESSIONS} sessions, {total} steps in {elapsed:.1f} s; {failed} sessions saw failures "
          f"({sum(c.failures for c in clients)} failed requests, re-sent); longest stall after a failure "
          f"{max(stalls, default=0):.2f} s")
    for p in problems:
        print("  " + p)
    return not problems


@contextmanager
def ray_serve(tmp: Path, log_name: str = "ray.log") -> Iterator[tuple[str, dict[str, dict]]]:
    """``python -m service.ray`` (2 replicas) on a local redis-server, output in ``tmp/log_name``; yields
    host:port and the replicas (``wait_replicas``) once both answer; stops both on the way out."""
    redis_port, port = free_port(), free_port()
    redis = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(redis_port), "--save", "",
                              "--appendonly", "no", "--dir", str(tmp)], stdout=subprocess.DEVNULL)
    env = {**os.environ, "PSN_STATE_URL": f"redis://127.0.0.1:{redis_port}/0", "PSN_PORT": str(port),
           "PSN_HOST": "127.0.0.1", "PSN_RAY_REPLICAS": "2", "PSN_WORKERS": "1",
           "PSN_MODEL_DIR": str(ROOT / "exported")}
    with open(tmp / log_name, "w") as log:
        app = subprocess.Popen([sys.executable, "-m", "service.ray"], cwd=ROOT, env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
        try:
            base = f"127.0.0.1:{port}"
            yield base, wait_replicas(base, 2, 180)
        finally:
            app.send_signal(signal.SIGTERM)
            try:
                app.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(app.pid, signal.SIGKILL)
                app.wait()
            redis.kill()
            redis.wait()


def main() -> int:
    args = sys.argv[1:] or ["ray"]
    if args in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if args != ["ray"] and (args[0] != "url" or len(args) != 3):  # was: anything but 'url' started Ray Serve
        print(f"cluster_smoke: bad arguments: {' '.join(args)}\nusage: python scripts/cluster_smoke.py [ray]\n"
              "       python scripts/cluster_smoke.py url HOST:PORT KILL_COMMAND", file=sys.stderr)
        return 2
    mode = args[0]
    if mode == "url":
        base, command = args[1], args[2]
        ok = run(base, lambda: subprocess.run(command, shell=True, check=False))
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1
    tmp = Path(tempfile.mkdtemp(prefix="psn-cluster-smoke-"))
    ok = False
    try:
        t0 = time.monotonic()
        with ray_serve(tmp) as (base, replicas):
            print(f"Ray Serve up with replicas {sorted(replicas)} in {time.monotonic() - t0:.1f} s")
            victim = sorted(replicas)[0]

            def kill() -> None:
                pid = replicas[victim]["pid"]
                procs = [pid, *descendants(pid)]  # the replica's actor and its whole service: as if its machine died
                for p in procs:
                    try:
                        os.kill(p, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                print(f"killed replica {victim} (SIGKILL to {len(procs)} processes)", flush=True)

            ok = run(base, kill)
    except Exception as e:  # noqa: BLE001 - reported as FAIL
        print(f"error: {type(e).__name__}: {e}")
    if not ok:
        print(f"(logs: {tmp}/ray.log)")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
