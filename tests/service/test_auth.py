"""Access control through the real server (two front-end workers): API keys on HTTP and on the WebSocket
handshake (a header, or a browser's ``psn.key.<key>`` subprotocol), sessions and OIP sequences that belong
to a key, per-key limits, the Origin policy and CORS, the bound on request heads, and session ids kept out
of the logs. Ownership and the limits live in the engine core (unit tests with its clock: test_core.py);
here they must hold whichever worker serves a request."""

from __future__ import annotations

import json
import pickle
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from service.config import KeySettingsError, Settings
from service.frontend.auth import KeyRing
from tests.service.conftest import DEFAULTS, Reference, Server, assert_outputs, oip_sequence

KEY_A = "test-key-a-0123456789abcdef"
KEY_B = "test-key-b-0123456789abcdef"
KEY_C = "test-key-c-0123456789abcdef"  # from PSN_API_KEYS_FILE
ALLOWED = "http://allowed.example"
FOREIGN = "http://evil.example"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def keyed(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Keys A and B from PSN_API_KEYS, C from PSN_API_KEYS_FILE; one allowed foreign origin (written with a capital
    and a trailing slash, as an operator may: the browser's Origin has neither); no per-key limits."""
    tmp = tmp_path_factory.mktemp("keyed")
    (tmp / "keys").write_text(f"# one key per line\n\n{KEY_C}\n")
    srv = Server({**DEFAULTS, "model_dir": model_dir, "workers": 2, "api_keys": f"{KEY_A}, {KEY_B}",
                  "api_keys_file": tmp / "keys", "allowed_origins": f"{ALLOWED.replace('allowed', 'Allowed')}/"}, tmp)
    srv.start()
    yield srv
    srv.stop()


def clients_on_workers(srv: Server, stack: ExitStack, limit: int = 64) -> dict[int, httpx.Client]:
    """One HTTP client (a kept-alive connection) on each front-end worker."""
    found: dict[int, httpx.Client] = {}
    for _ in range(limit):
        c = httpx.Client(base_url=srv.url, timeout=20)
        w = c.get("/healthz").json()["worker"]
        if w in found:
            c.close()
            continue
        found[w] = c
        stack.callback(c.close)
        if len(found) == int(srv.settings["workers"]):
            return found
    raise AssertionError(f"reached workers {sorted(found)} only")


def ws_on_workers(srv: Server, stack: ExitStack, key: str, limit: int = 64) -> dict[int, ClientConnection]:
    found: dict[int, ClientConnection] = {}
    for _ in range(limit):
        with ExitStack() as attempt:
            ws = attempt.enter_context(connect(srv.ws_url, additional_headers=auth(key)))
            w = int(ws.response.headers["x-psn-worker"])
            if w not in found:
                found[w] = ws
                stack.push(attempt.pop_all())
        if len(found) == int(srv.settings["workers"]):
            return found
    raise AssertionError(f"reached workers {sorted(found)} only")


def ask(ws: ClientConnection, msg: dict) -> dict:
    ws.send(json.dumps(msg))
    return json.loads(ws.recv(timeout=10))


def handshake_status(srv: Server, **kwargs) -> int:
    """The HTTP status a refused WebSocket handshake gets (101 if it is accepted)."""
    try:
        with connect(srv.ws_url, **kwargs):
            return 101
    except InvalidStatus as e:
        return e.response.status_code


def same_error(r: httpx.Response, other: httpx.Response, sid: str, other_sid: str) -> bool:
    """Two 404 answers that are the same but for the id each names."""
    return (r.status_code, r.json()) == (other.status_code, json.loads(other.text.replace(other_sid, sid)))


# ----- settings -------------------------------------------------------------------------------------
def test_settings_keep_only_hashes_and_refuse_bad_keys(tmp_path: Path) -> None:
    (tmp_path / "keys").write_text(f"{KEY_C}\n# a comment\n\n")
    s = Settings(api_keys=f" {KEY_A},{KEY_B} ,", api_keys_file=tmp_path / "keys")
    assert len(s.key_hashes) == 3 and s.api_keys is None
    assert KEY_A.encode() not in pickle.dumps(s)  # what the supervisor hands to its children
    ring = KeyRing(s.key_hashes)
    owners = {ring.owner(k) for k in (KEY_A, KEY_B, KEY_C)}
    assert len(owners) == 3 and all(o and len(o) == 16 and KEY_A[:8] not in o for o in owners)
    assert ring.owner(KEY_A) == KeyRing(Settings(api_keys=KEY_A).key_hashes).owner(KEY_A)  # stable
    assert ring.owner(KEY_A + "x") is None and ring.owner("") is None
    assert Settings().key_hashes == () and Settings(api_keys="").key_hashes == ()  # off by default
    (tmp_path / "empty").write_text("# no keys yet\n")
    for kwargs, words in (({"api_keys": f"{KEY_A},short-key"}, "key 2"), ({"api_keys": "key with spaces 123"}, "key 1"),
                          ({"api_keys_file": tmp_path / "empty"}, "no keys"),
                          ({"api_keys_file": tmp_path / "missing"}, "cannot read")):
        with pytest.raises(KeySettingsError) as e:
            Settings(**kwargs)
        assert words in str(e.value) and "short-key" not in str(e.value) and "spaces" not in str(e.value)
    for n in (16, 256):  # the bounds themselves are keys; one character short of or past them is not
        assert len(Settings(api_keys=f"{KEY_A},{'k' * n}").key_hashes) == 2
    for n in (15, 257):
        with pytest.raises(KeySettingsError, match="key 2 must be 16-256 characters"):
            Settings(api_keys=f"{KEY_A},{'k' * n}")


@pytest.mark.parametrize("mode", [0o644, 0o444, 0o600], ids=["0644", "0444", "0600"])
def test_a_key_file_others_can_read_is_used_with_one_warning(serve, tmp_path: Path, mode: int) -> None:
    """A PSN_API_KEYS_FILE readable by group or others was taken without a word. ssh refuses such a file, but
    Docker and Kubernetes often mount secrets 0444 and read-only: the service starts, with one warning."""
    path = tmp_path / "keys"
    path.write_text(f"{KEY_C}\n")
    path.chmod(mode)
    srv = serve(api_keys_file=path)
    assert httpx.get(f"{srv.url}/v1/models", headers=auth(KEY_C)).status_code == 200
    warnings = [line for line in srv.log().splitlines() if "PSN_API_KEYS_FILE" in line]
    if mode & 0o044:
        assert len(warnings) == 1 and " WARNING " in warnings[0], srv.log()
        assert f"{path} can be read by users other than its owner (mode {mode:04o}); chmod 600" in warnings[0]
    else:
        assert warnings == [], srv.log()
    assert KEY_C not in srv.log()


KEY_FILE_MODES = [(0o604, "read"), (0o640, "read"), (0o620, "changed"), (0o602, "changed"), (0o666, "read and changed"),
                  (0o644, "read"), (0o600, None), (0o711, None)]


@pytest.mark.parametrize(("mode", "can"), KEY_FILE_MODES, ids=[f"{mode:04o}" for mode, _ in KEY_FILE_MODES])
def test_the_key_file_warning_names_what_others_may_do_and_only_that(tmp_path: Path, mode: int,
                                                                     can: str | None) -> None:
    """Read and write bits of the group and of others each count, alone (others' read as group's, a file others
    can only change as one they can read); execute bits give nothing away and are not warned about."""
    path = tmp_path / "keys"
    path.write_text(f"{KEY_C}\n")
    path.chmod(mode)
    warning = Settings(api_keys_file=path).keys_file_warning
    if can is None:
        assert warning is None
    else:
        assert warning == (f"PSN_API_KEYS_FILE: {path} can be {can} by users other than its owner (mode {mode:04o}); "
                           "chmod 600 it")


def test_no_process_of_the_service_has_the_keys_in_its_environment(keyed: Server) -> None:
    """The supervisor keeps the keys' hashes and drops PSN_API_KEYS before it starts its children: neither a front
    end's nor the engine core's environment (/proc/PID/environ, a core dump) holds a key."""
    health = httpx.get(f"{keyed.url}/healthz", timeout=10).json()
    for pid in (health["pid"], health["engine_pid"]):
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert not [v for v in env if v.startswith(b"PSN_API_KEYS=") or KEY_A.encode() in v], pid


# ----- keys on HTTP and WebSocket ------------------------------------------------------------------
PROTECTED = [("GET", "/v1/models"), ("GET", "/v1/models/sliding"), ("POST", "/v1/sessions"),
             ("GET", "/v1/sessions/abc"), ("DELETE", "/v1/sessions/abc"), ("POST", "/v1/sessions/abc/steps"),
             ("POST", "/v1/classify"), ("GET", "/metrics"), ("GET", "/v2"), ("GET", "/v2/models/sliding"),
             ("GET", "/v2/models/sliding/ready"), ("POST", "/v2/models/sliding/infer"),
             ("GET", "/demo/samples/sliding"), ("GET", "/v1/no-such-route")]
PUBLIC = ["/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/demo", "/demo/static/demo.js",
          "/openapi.json", "/docs"]


def test_every_route_but_the_probes_and_docs_needs_a_valid_key(keyed: Server) -> None:
    with httpx.Client(base_url=keyed.url, timeout=20) as c:
        for method, path in PROTECTED:
            for headers in ({}, auth("wrong-key-0123456789abcdef"), {"Authorization": f"Basic {KEY_A}"},
                            {"Authorization": KEY_A}):
                r = c.request(method, path, headers=headers, json={})
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (method, path, r.text)
                err = r.json()["error"]
                if path.startswith("/v2"):  # the Open Inference Protocol's error shape
                    assert isinstance(err, str) and "API key" in err
                else:
                    assert err["code"] == "unauthorized" and err["field"] == "Authorization"
            assert c.request(method, path, params={"api_key": KEY_A}).status_code == 401  # never in the URL
        assert "Bearer" in c.get("/v1/models").json()["error"]["message"]  # says how to send one
        for path in PUBLIC:
            assert c.get(path).status_code == 200, path
        for key in (KEY_A, KEY_B, KEY_C):
            assert c.get("/v1/models", headers=auth(key)).status_code == 200
        assert 'psn_errors_total{code="unauthorized"}' in c.get("/metrics", headers=auth(KEY_A)).text


def test_websocket_handshake_needs_a_valid_key(keyed: Server) -> None:
    wrong = "wrong-key-0123456789abcdef"
    assert handshake_status(keyed) == 401
    assert handshake_status(keyed, additional_headers=auth(wrong)) == 401
    assert handshake_status(keyed, subprotocols=["psn.json.v1", f"psn.key.{wrong}"]) == 401
    assert handshake_status(keyed, subprotocols=["psn.json.v1"]) == 401
    with connect(keyed.ws_url, additional_headers=auth(KEY_A)) as ws:
        assert ws.subprotocol is None and ask(ws, {"type": "open", "model": "sliding"})["type"] == "opened"
    # a browser: the key as a subprotocol entry; the server selects the real subprotocol, never the key
    with connect(keyed.ws_url, subprotocols=["psn.json.v1", f"psn.key.{KEY_C}"]) as ws:
        assert ws.subprotocol == "psn.json.v1" and KEY_C not in str(ws.response.headers)
        assert ask(ws, {"type": "open", "model": "sliding"})["type"] == "opened"
        assert ask(ws, {"type": "steps", "steps": [[0.5, 0.5, 0.5]]})["start"] == 0
    with connect(keyed.ws_url, subprotocols=[f"psn.key.{KEY_A}"]) as ws:  # accepted, the key is never selected
        assert ws.subprotocol is None and KEY_A not in str(ws.response.headers)  # (a browser then fails the handshake)
    with connect(keyed.ws_url, subprotocols=[f"psn.key.{KEY_B}", "psn.binary.v1"]) as ws:
        assert ws.subprotocol == "psn.binary.v1"
        ask(ws, {"type": "open", "model": "sliding"})
        ws.send(struct.pack("<IIq", 5, 1, -1) + np.zeros(3, "<f4").tobytes())
        assert struct.unpack_from("<IIq", ws.recv(timeout=10)) == (5, 1, 0)


# ----- ownership -----------------------------------------------------------------------------------
def test_a_session_belongs_to_the_key_that_opened_it(keyed: Server, ref: Reference) -> None:
    x = ref.sequence("sliding", 6, seed=31)
    missing = "nO5uChSe5s1onEverEx1st"
    with ExitStack() as stack:
        http = clients_on_workers(keyed, stack)
        a, b = auth(KEY_A), auth(KEY_B)
        sid = http[0].post("/v1/sessions", json={"model": "sliding"}, headers=a).json()["session_id"]
        for w, c in sorted(http.items()):  # each worker (the one A opened it on has its model cached for A)
            r = c.post(f"/v1/sessions/{sid}/steps", json={"steps": x[2 * w:2 * w + 2].tolist()}, headers=a)
            assert r.status_code == 200 and r.json()["start"] == 2 * w, r.text
            for method, path, body in (("GET", "", None), ("DELETE", "", None),
                                       ("POST", "/steps", {"steps": x[:1].tolist()}),
                                       ("POST", "/steps", {"steps": [[1.0, 2.0]]}),  # 404, not a 422 for the shape
                                       ("POST", "/steps", {"steps": x[:1].tolist(), "start": 0})):
                theirs = c.request(method, f"/v1/sessions/{sid}{path}", json=body, headers=b)
                nothing = c.request(method, f"/v1/sessions/{missing}{path}", json=body, headers=b)
                assert theirs.status_code == 404 and same_error(theirs, nothing, sid, missing), (w, method, theirs.text)
        # over the WebSocket, on each worker: attach is answered as for an id that never existed, whether the
        # session was opened over HTTP or over a WebSocket
        ws_a = stack.enter_context(connect(keyed.ws_url, additional_headers=a))
        sid_ws = ask(ws_a, {"type": "open", "model": "sliding"})["session"]["session_id"]
        for ws in ws_on_workers(keyed, stack, KEY_B).values():
            for s in (sid, sid_ws):
                theirs, nothing = (ask(ws, {"type": "attach", "session_id": i}) for i in (s, missing))
                assert theirs["error"]["code"] == "session_not_found", theirs
                assert theirs == json.loads(json.dumps(nothing).replace(missing, s))
            assert ask(ws, {"type": "steps", "steps": x[:1].tolist()})["error"]["field"] == "type"  # nothing bound
        assert http[1].get(f"/v1/sessions/{sid_ws}", headers=b).status_code == 404
        assert http[1].get(f"/v1/sessions/{sid_ws}", headers=a).status_code == 200
        info = http[1].get(f"/v1/sessions/{sid}", headers=a).json()
        assert info["steps_seen"] == 4  # B's requests changed nothing
        r = http[1].post(f"/v1/sessions/{sid}/steps", json={"steps": x[4:].tolist()}, headers=a)
        assert_outputs(r.json()["outputs"], ref.outputs("sliding", x), start=4)
        assert http[0].delete(f"/v1/sessions/{sid}", headers=a).status_code == 204
        assert http[1].get(f"/v1/sessions/{sid}", headers=a).json()["error"]["code"] == "session_closed"
        theirs, nothing = (http[0].get(f"/v1/sessions/{s}", headers=b) for s in (sid, missing))
        assert theirs.status_code == 404 and same_error(theirs, nothing, sid, missing)  # gone: still not B's
    # the session id is in the access log's paths, cut to 8 characters, never in full
    deadline = time.monotonic() + 10
    while f"/v1/sessions/{sid[:8]}.../steps" not in keyed.log():
        assert time.monotonic() < deadline, keyed.log()[-3000:]
        time.sleep(0.05)
    assert sid not in keyed.log()


def test_oip_sequences_are_per_key(keyed: Server, ref: Reference) -> None:
    tc = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is a dev dependency")
    client = tc.InferenceServerClient(url=f"127.0.0.1:{keyed.port}")
    xs = {KEY_A: ref.sequence("sliding", 6, seed=41), KEY_B: ref.sequence("sliding", 6, seed=42)}

    def infer(key: str | None, x, **seq) -> np.ndarray:
        inp = tc.InferInput("steps", [1, len(x), 3], "FP32")
        inp.set_data_from_numpy(x.numpy().astype(np.float32)[None])
        return client.infer("sliding", [inp], headers=auth(key) if key else None, **seq).as_numpy("scores")[0]

    with pytest.raises(tc.InferenceServerException) as e:
        infer(None, xs[KEY_A], sequence_id=7, sequence_start=True)
    assert e.value.status() == "401"
    got: dict[str, list] = {KEY_A: [], KEY_B: []}
    for i in range(3):  # both keys stream their own sequence 7, interleaved
        for key in (KEY_A, KEY_B):
            got[key].append(infer(key, xs[key][2 * i:2 * i + 2], sequence_id=7, sequence_start=i == 0))
    for key, x in xs.items():
        expect = np.asarray(ref.outputs("sliding", x.float().double())[1])
        assert np.concatenate(got[key]) == pytest.approx(expect, rel=1e-5, abs=1e-5)
    infer(KEY_A, xs[KEY_A][:1], sequence_id=8, sequence_start=True)
    with pytest.raises(tc.InferenceServerException, match="sequence_start"):  # A's sequence 8 is not B's
        infer(KEY_B, xs[KEY_B][:1], sequence_id=8)
    infer(KEY_B, xs[KEY_B][:1], sequence_id=7, sequence_end=True)  # B ends its 7; A's 7 goes on
    assert infer(KEY_A, xs[KEY_A][:1], sequence_id=7).shape == (1, 4)


def test_an_oip_batch_over_the_keys_step_rate_is_refused_whole(serve) -> None:
    """An OIP classify batch (``B`` sequences, no sequence id) is B engine requests: each was admitted on its own,
    so a batch larger than what the key's bucket held was computed and charged in part, then answered 429; a
    client that retried as told (the Retry-After of the one refused sequence) paid again each time and never
    got through. The whole batch is now admitted or refused."""
    srv = serve(api_keys=KEY_A, key_steps_per_s=0.01, max_steps_per_request=64)  # a burst of 64, then ~nothing

    def batch(n: int) -> httpx.Response:
        return httpx.post(f"{srv.url}/v2/models/sliding/infer", headers=auth(KEY_A), timeout=20, json={"inputs": [
            {"name": "steps", "shape": [n, 1, 3], "datatype": "FP32", "data": [0.5] * 3 * n}]})

    assert batch(40).status_code == 200  # 24 steps left
    r = batch(40)
    assert r.status_code == 429 and "40 more fit" in r.json()["error"], r.text
    assert int(r.headers["Retry-After"]) > 1000  # 16 steps short at 0.01 per second
    r = batch(24)  # the refused batch took none of them
    assert r.status_code == 200 and r.json()["outputs"][1]["shape"] == [24, 1, 4], r.text[:300]


def test_a_key_opening_and_closing_sessions_in_a_loop_keeps_another_keys_ended_ids(serve) -> None:
    """PSN_REMEMBER_GONE bounds the ended ids answered 410; one key's open/close loop used to push every other
    key's out (they turned 404, as ids that never existed): now it pushes out its own first."""
    srv = serve(api_keys=f"{KEY_A}, {KEY_B}", remember_gone=4)
    with httpx.Client(base_url=srv.url, timeout=20) as c:
        def cycle(key: str) -> str:
            sid = c.post("/v1/sessions", headers=auth(key), json={"model": "sliding"}).json()["session_id"]
            assert c.delete(f"/v1/sessions/{sid}", headers=auth(key)).status_code == 204
            return sid

        mine = [cycle(KEY_B) for _ in range(2)]
        theirs = [cycle(KEY_A) for _ in range(12)]
        for sid in mine:
            r = c.get(f"/v1/sessions/{sid}", headers=auth(KEY_B))
            assert r.status_code == 410 and r.json()["error"]["code"] == "session_closed", r.text
        assert c.get(f"/v1/sessions/{theirs[-1]}", headers=auth(KEY_A)).status_code == 410
        assert c.get(f"/v1/sessions/{theirs[0]}", headers=auth(KEY_A)).status_code == 404  # its own were forgotten


# ----- browsers: Origin and CORS -------------------------------------------------------------------
def test_websocket_origin_allow_list_and_cors(keyed: Server) -> None:
    own = f"http://127.0.0.1:{keyed.port}"
    for origin, status in ((ALLOWED, 101), (own, 101), (None, 101), (FOREIGN, 403), ("null", 403),
                           (f"http://127.0.0.1:{keyed.port + 1}", 403)):
        assert handshake_status(keyed, origin=origin, additional_headers=auth(KEY_A)) == status, origin
    assert handshake_status(keyed, origin=FOREIGN) == 403  # refused for the origin before the key is looked at
    with httpx.Client(base_url=keyed.url, timeout=20) as c:
        preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, "
                     "content-type"}
        r = c.options("/v1/sessions", headers={"Origin": ALLOWED, **preflight})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ALLOWED
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        assert "POST" in r.headers["access-control-allow-methods"]
        r = c.options("/v1/sessions", headers={"Origin": FOREIGN, **preflight})
        assert "access-control-allow-origin" not in r.headers and r.status_code == 403
        assert r.json()["error"]["code"] == "origin_not_allowed" and r.json()["error"]["field"] == "Origin", r.text
        # a refused preflight in the API's shape (under /v2 the protocol's), not Starlette's 'Disallowed CORS ...'
        for path, asked, field in (
                ("/v1/sessions", {"Access-Control-Request-Method": "PUT"}, "Access-Control-Request-Method"),
                ("/v1/sessions", {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-evil"},
                 "Access-Control-Request-Headers")):
            r = c.options(path, headers={"Origin": ALLOWED, **asked})
            err = r.json()["error"]
            assert r.status_code == 400 and err["code"] == "bad_request" and err["field"] == field, r.text
            assert r.headers["access-control-allow-origin"] == ALLOWED  # the page can read why
        r = c.options("/v2/models/sliding/infer", headers={"Origin": ALLOWED, "Access-Control-Request-Method": "PUT"})
        assert r.status_code == 400 and "Access-Control-Request-Method" in r.json()["error"], r.text
        r = c.post("/v1/sessions", json={"model": "sliding"}, headers={"Origin": ALLOWED, **auth(KEY_A)})
        assert r.status_code == 201 and r.headers["access-control-allow-origin"] == ALLOWED
        assert "retry-after" in r.headers["access-control-expose-headers"].lower()
        r = c.post("/v1/sessions", json={"model": "sliding"}, headers={"Origin": ALLOWED})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ALLOWED  # the page can read why
        r = c.post("/v1/sessions", json={"model": "sliding"}, headers={"Origin": FOREIGN, **auth(KEY_A)})
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
        assert "access-control-allow-origin" not in r.headers


def test_two_authorization_or_two_origin_headers_are_refused_400_naming_the_header(keyed: Server) -> None:
    """Which of two keys (or origins) counts would be a guess: a proxy that adds its own header must not
    make the server pick one. Either order, HTTP and the WebSocket handshake."""
    wrong = "wrong-key-0123456789abcdef"
    with httpx.Client(base_url=keyed.url, timeout=20) as c:
        for headers in ([("Authorization", f"Bearer {KEY_A}"), ("Authorization", f"Bearer {wrong}")],
                        [("Authorization", f"Bearer {wrong}"), ("Authorization", f"Bearer {KEY_A}")],
                        [("Authorization", f"Bearer {KEY_A}"), ("Authorization", f"Bearer {KEY_A}")],
                        [("Authorization", f"Bearer {KEY_A}"), ("Origin", ALLOWED), ("Origin", FOREIGN)],
                        [("Authorization", f"Bearer {KEY_A}"), ("Origin", FOREIGN), ("Origin", ALLOWED)]):
            field = headers[-1][0]
            r = c.post("/v1/sessions", json={"model": "sliding"}, headers=headers)
            err = r.json()["error"]
            assert r.status_code == 400 and err["code"] == "bad_request" and err["field"] == field, r.text
            assert f"more than one {field} header" in err["message"]
            assert handshake_status(keyed, additional_headers=headers) == 400
            r = c.post("/v2/models/sliding/infer", json={}, headers=headers)
            assert r.status_code == 400 and f"more than one {field} header" in r.json()["error"]  # OIP's shape
        assert c.post("/v1/sessions", json={"model": "sliding"}, headers=[
            ("Authorization", f"Bearer {KEY_A}"), ("Origin", ALLOWED)]).status_code == 201


def test_a_host_not_of_this_server_is_refused_while_it_listens_on_loopback(serve) -> None:
    """DNS rebinding: a page of evil.example whose name is made to resolve to 127.0.0.1 is same-origin with
    itself (Origin matches Host), so with access control off, the default, it could use the local API. Listening
    on loopback only, the service now answers loopback names alone; PSN_ALLOWED_HOSTS names others ("*": any).
    Two Host headers are refused as two Origins are."""
    srv = serve(workers=1)
    assert srv.url.startswith("http://127.0.0.1:")
    with httpx.Client(base_url=srv.url, timeout=20) as c:
        for host in (f"evil.example:{srv.port}", "evil.example", f"127.0.0.1.evil.example:{srv.port}",
                     f"localhost.evil.example:{srv.port}", f"[::2]:{srv.port}"):
            for method, path in (("GET", "/v1/models"), ("POST", "/v1/sessions"), ("GET", "/healthz")):
                r = c.request(method, path, json={"model": "sliding"} if method == "POST" else None,
                              headers={"Host": host, "Origin": f"http://{host}"})
                err = r.json()["error"]
                assert r.status_code == 403 and err["code"] == "host_not_allowed" and err["field"] == "Host", r.text
                assert "PSN_ALLOWED_HOSTS" in err["message"]
            ws = raw_request(srv, b"GET /v1/stream HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\n"
                             b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                             b"Sec-WebSocket-Version: 13\r\n\r\n" % host.encode())
            assert ws.startswith(b"HTTP/1.1 403 ") and b'"host_not_allowed"' in ws, ws[:300]
        for host in (f"localhost:{srv.port}", f"127.0.0.1:{srv.port}", f"127.9.9.9:{srv.port}", f"[::1]:{srv.port}",
                     f"app.localhost:{srv.port}", "LocalHost.", "127.0.0.1"):
            assert c.get("/v1/models", headers={"Host": host}).status_code == 200, host
    two = raw_request(srv, b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\n"
                           b"Connection: close\r\n\r\n")
    assert two.startswith(b"HTTP/1.1 400 ") and b"more than one Host header" in two, two[:300]
    named = serve(workers=1, allowed_hosts="API.example.com, psn.internal")
    with httpx.Client(base_url=named.url, timeout=20) as c:
        for host, status in (("api.example.com", 200), ("api.example.com.", 200), ("psn.internal:8443", 200),
                             ("localhost", 200),
                             ("evil.example", 403), ("example.com", 403)):
            assert c.get("/v1/models", headers={"Host": host}).status_code == status, host
    anyhost = serve(workers=1, allowed_hosts="*")
    assert httpx.get(f"{anyhost.url}/v1/models", headers={"Host": "evil.example"}, timeout=20).status_code == 200
    assert Settings(host="0.0.0.0").hosts is None and Settings(host="::").hosts is None  # every interface
    assert Settings(host="127.0.0.1").hosts == () and Settings(host="localhost").hosts == ()
    assert Settings(host="192.168.1.5").hosts is None and Settings(host="::1").hosts == ()


# ----- the request head is bounded ------------------------------------------------------------------
def raw_request(srv: Server, head: bytes, chunk: int = 0) -> bytes:
    """Send ``head`` (in ``chunk``-byte writes a moment apart, 0: at once) and read the answer until the server
    closes. (Each write is read before the next: a server that closes with unread data resets the connection,
    and the client may then lose the answer.)"""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        step = chunk or len(head)
        for i in range(0, len(head), step):
            s.sendall(head[i:i + step])
            if chunk:
                time.sleep(0.05)
        out = b""
        while data := s.recv(65536):
            out += data
        return out


def test_an_oversized_request_head_is_answered_431(keyed: Server) -> None:
    ok = raw_request(keyed, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nX-Pad: " + b"a" * 8000
                     + b"\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200")
    ws_head = (b"GET /v1/stream HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n")
    for head, chunk in ((b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Pad: " + b"a" * 40_000 + b"\r\n\r\n", 0),
                        (b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n" + b"X-Pad: aaaaaaaa\r\n" * 3000 + b"\r\n", 0),
                        (b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Pad: " + b"a" * 48_000,
                         16384),  # not ended yet
                        (ws_head + b"X-Pad: " + b"a" * 40_000 + b"\r\n\r\n", 0)):
        t0 = time.monotonic()
        answer = raw_request(keyed, head, chunk)
        assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "headers_too_large"
        assert time.monotonic() - t0 < 5
    assert httpx.get(f"{keyed.url}/healthz").status_code == 200
    # a pipelined request whose head starts in the same read as the end of the body before it
    body = b'{"model": "sliding"' + b" " * 40_000 + b"}"  # padded with JSON whitespace (no unknown field)
    with socket.create_connection(("127.0.0.1", keyed.port), timeout=10) as s:
        head = b"POST /v1/sessions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer %s\r\nContent-Length: %d\r\n" \
               b"Content-Type: application/json\r\n\r\n"
        s.sendall(head % (KEY_A.encode(), len(body)) + body + b"GET /healthz HTTP/1.1\r\n")
        time.sleep(0.2)
        s.sendall(b"Host: localhost\r\nConnection: close\r\n\r\n")
        answers = b""
        while data := s.recv(65536):
            answers += data
    assert answers.startswith(b"HTTP/1.1 201") and answers.count(b"HTTP/1.1 200") == 1, answers[:300]
    with httpx.Client(base_url=keyed.url, timeout=20, headers=auth(KEY_A)) as c:  # bodies are not heads
        for _ in range(3):  # one kept-alive connection: what one request's head used is not carried over
            r = c.post("/v1/sessions", content=b'{"model": "sliding"' + b" " * 300_000 + b"}",
                       headers={"X-Pad": "a" * 20_000, "content-type": "application/json"})
            assert r.status_code == 201, r.text


def test_what_the_protocol_parsers_refuse_is_answered_in_the_api_shape(keyed: Server) -> None:
    """A WebSocket handshake over the websockets library's limits (8,192-byte lines, 128 headers) but under
    PSN_MAX_HEADER_BYTES used to get no answer at all (uvicorn left it unsent); an HTTP request httptools
    cannot parse got a plain-text line; a refused handshake and a text frame that is not UTF-8 were logged
    as errors (with a traceback), which any client could fill the log with."""
    logged = len(keyed.log())
    ws_head = (b"Host: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
               b"Authorization: Bearer " + KEY_A.encode() + b"\r\n")
    for head, status, code, field in (
            (b"GET /v1/stream?session_id=" + b"z" * 9000 + b" HTTP/1.1\r\n" + ws_head + b"\r\n", 414, "url_too_long",
             "url"),
            (b"GET /v1/stream HTTP/1.1\r\n" + ws_head + b"X-Pad: " + b"a" * 9000 + b"\r\n\r\n", 431,
             "headers_too_large", "headers"),
            (b"GET /v1/stream HTTP/1.1\r\n" + ws_head + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n", 431,
             "headers_too_large", "headers")):
        t0 = time.monotonic()
        answer = raw_request(keyed, head)
        assert answer.startswith(b"HTTP/1.1 %d" % status), answer[:200]
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"] | {"message": ""} == {
            "code": code, "field": field, "message": ""}
        assert time.monotonic() - t0 < 5
    with connect(keyed.ws_url, additional_headers={**auth(KEY_A), "X-Pad": "a" * 7000}) as ws:  # under them: fine
        ws.send(json.dumps({"type": "open", "model": "sliding"}))
        assert json.loads(ws.recv(timeout=10))["type"] == "opened"
        ws.send('{"type": "open", "model": "\xff"}'.encode("latin-1"), text=True)  # a text frame, not UTF-8
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1007  # RFC 6455: invalid data
    for path, framing in ((b"/v2/models/sliding/infer", b"Content-Length: -1\r\n"),
                          (b"/v1/classify", b"Content-Length: 5\r\nContent-Length: 6\r\n"),
                          (b"/v1/classify", b"Transfer-Encoding: chunked\r\n\r\nzz")):
        answer = raw_request(keyed, b"POST " + path + b" HTTP/1.1\r\nHost: localhost\r\n" + framing + b"\r\n")
        assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
        body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        if path.startswith(b"/v2"):  # the protocol's shape
            assert "not a valid HTTP/1.1 request" in body["error"]
        else:
            assert body["error"]["code"] == "bad_request" and body["error"]["field"] == "request"
    assert handshake_status(keyed, origin=FOREIGN) == 403
    assert httpx.get(f"{keyed.url}/healthz").status_code == 200
    log = keyed.log()[logged:]
    assert "Traceback" not in log and "without completing handshake" not in log and "ERROR" not in log, log



def test_a_key_in_a_subprotocol_header_that_does_not_parse_is_never_logged(keyed: Server) -> None:
    """websockets quotes a Sec-WebSocket-Protocol header it cannot parse in full in its error, which the refusal
    logged (and answered): a browser's key (``psn.key.<key>``) was written in clear to the service's log."""
    logged = len(keyed.log())
    for protocols in (f"psn.json.v1, psn.key.{KEY_A}, @@", f"psn.key.{KEY_B}@, psn.binary.v1"):
        answer = raw_request(keyed, b"GET /v1/stream HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                             b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                             b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: %s\r\n\r\n" % protocols.encode())
        assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
        error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
        assert error["code"] == "bad_request" and "Sec-WebSocket-Protocol" in error["message"], error
        assert "psn.key.***" in error["message"] and KEY_A not in error["message"] and KEY_B not in error["message"]
    deadline = time.monotonic() + 10
    while keyed.log()[logged:].count("websocket handshake refused") < 2:
        assert time.monotonic() < deadline, keyed.log()[logged:]
        time.sleep(0.05)
    log = keyed.log()[logged:]
    assert "psn.key.***" in log and KEY_A not in log and KEY_B not in log, log

def test_a_session_id_in_the_stream_url_is_cut_in_the_log(keyed: Server) -> None:
    """``/v1/stream?session_id=ID`` (how a proxy routes a WebSocket, docs/cluster.md) was written to uvicorn's
    access log with the id in full, accepted or refused, while ids in paths were cut to 8 characters."""
    logged = len(keyed.log())
    sid = httpx.post(f"{keyed.url}/v1/sessions", json={"model": "sliding"}, headers=auth(KEY_A)).json()["session_id"]
    url = f"{keyed.ws_url}?session_id={sid}"
    with connect(url, additional_headers=auth(KEY_A)) as ws:
        assert ask(ws, {"type": "attach", "session_id": sid})["type"] == "attached"
    with pytest.raises(InvalidStatus):  # refused: no key
        connect(url)
    assert httpx.get(url.replace("ws://", "http://")).status_code == 401  # plain HTTP, refused too
    deadline = time.monotonic() + 10
    while keyed.log()[logged:].count(f"?session_id={sid[:8]}...") < 3:
        assert time.monotonic() < deadline, keyed.log()[logged:]
        time.sleep(0.05)
    assert sid not in keyed.log()[logged:], keyed.log()[logged:]


# ----- per-key limits -------------------------------------------------------------------------------
def test_per_key_session_and_step_limits_across_workers(serve, ref: Reference) -> None:
    srv = serve(workers=2, api_keys=f"{KEY_A},{KEY_B}", key_max_sessions=2, key_steps_per_s=2,
                max_steps_per_request=16)
    step = [0.5, 0.5, 0.5]
    with ExitStack() as stack:
        http = clients_on_workers(srv, stack)
        a, b = auth(KEY_A), auth(KEY_B)
        s1 = http[0].post("/v1/sessions", json={"model": "sliding"}, headers=a).json()["session_id"]
        ws = ws_on_workers(srv, stack, KEY_A)
        assert ask(ws[1], {"type": "open", "model": "sliding"})["type"] == "opened"
        for c in http.values():  # a third is refused, whichever worker is asked
            r = c.post("/v1/sessions", json={"model": "sliding"}, headers=a)
            assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_key_sessions", r.text
            assert int(r.headers["Retry-After"]) >= 1
        err = ask(ws[0], {"type": "open", "model": "sliding"})["error"]
        assert err["code"] == "too_many_key_sessions" and err["retry_after"] >= 1
        assert http[1].post("/v1/sessions", json={"model": "sliding"}, headers=b).status_code == 201  # B's own
        assert http[1].delete(f"/v1/sessions/{s1}", headers=a).status_code == 204
        assert http[0].post("/v1/sessions", json={"model": "sliding"}, headers=a).status_code == 201
        # steps: a burst of max(2/s, 16 steps per request) = 16, then 2 per second, shared by both workers
        assert ask(ws[1], {"type": "steps", "steps": [step] * 16})["start"] == 0
        r = http[0].post("/v1/classify", json={"model": "sliding", "steps": [step] * 4}, headers=a)
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited", r.text
        assert r.headers["Retry-After"] == "2"  # 4 steps at 2 per second
        err = ask(ws[1], {"type": "steps", "steps": [step] * 4, "id": 3})
        assert err["error"]["code"] == "rate_limited" and err["error"]["retry_after"] == 2 and err["id"] == 3
        assert http[0].post("/v1/classify", json={"model": "sliding", "steps": [step] * 4},
                            headers=b).status_code == 200  # B has its own bucket
        oip = http[1].post("/v2/models/sliding/infer", headers=a, json={"inputs": [
            {"name": "steps", "shape": [1, 4, 3], "datatype": "FP32", "data": step * 4}]})
        assert oip.status_code == 429 and "PSN_KEY_STEPS_PER_S" in oip.json()["error"] and "Retry-After" in oip.headers
        # B (12 steps left) streams sequence 5; a sequence_start of 16 more is refused and leaves it as it was
        x = ref.sequence("sliding", 6, seed=43)

        def seq(c: httpx.Client, steps, **params) -> httpx.Response:
            return c.post("/v2/models/sliding/infer", headers=b, json=oip_sequence(steps, 5, **params))

        assert seq(http[0], x[:4], sequence_start=True).status_code == 200
        r = seq(http[1], [step] * 16, sequence_start=True)
        assert r.status_code == 429 and "PSN_KEY_STEPS_PER_S" in r.json()["error"], r.text
        r = seq(http[0], x[4:6])  # goes on from step 4: the refused start did not reset it
        assert r.status_code == 200, r.text
        scores = next(o for o in r.json()["outputs"] if o["name"] == "scores")["data"]
        expect = np.asarray(ref.outputs("sliding", x.float().double())[1])[4:6]
        assert np.reshape(scores, expect.shape) == pytest.approx(expect, rel=1e-5, abs=1e-5)
        time.sleep(0.6)  # 1.2 steps' worth
        assert ask(ws[1], {"type": "steps", "steps": [step]})["start"] == 16
    # the default Origin policy (no PSN_ALLOWED_ORIGINS): this server's own pages and non-browser clients only
    own = f"http://127.0.0.1:{srv.port}"
    for origin, status in ((own, 101), (None, 101), (ALLOWED, 403)):
        assert handshake_status(srv, origin=origin, additional_headers=auth(KEY_B)) == status, origin
    r = httpx.options(f"{srv.url}/v1/sessions", headers={"Origin": ALLOWED, "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers
