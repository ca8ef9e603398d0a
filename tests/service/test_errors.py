"""Every bad input gets its documented 4xx/503 with a message naming the field; the server and the
session keep working afterwards."""

from __future__ import annotations

import asyncio
import json
import socket
import struct

import httpx
import numpy as np
import pytest
import websockets.sync.client as ws_client
from websockets.exceptions import ConnectionClosed

from service.errors import InvalidInput, TooManySessions
from tests.service.conftest import Reference, Server, assert_outputs

BAD_STEPS = [  # (body, status, code, words the message must contain)
    ({"steps": [[1.0, 2.0]]}, 422, "invalid_input", ["steps", "(L, 3)", "(1, 2)"]),
    ({"steps": [[1.0, 2.0, 3.0], [1.0, 2.0]]}, 422, "invalid_input", ["steps", "(L, 3)"]),
    ({"steps": [["a", "b", "c"]]}, 422, "invalid_input", ["steps", "numbers"]),
    ({"steps": [[1.0, None, 3.0]]}, 422, "invalid_input", ["steps"]),
    ({"steps": [[{"x": 1}, 2.0, 3.0]]}, 422, "invalid_input", ["steps"]),
    ({"steps": []}, 422, "invalid_input", ["steps", "non-empty"]),
    ({"steps": 5}, 422, "invalid_input", ["steps"]),
    ({"stepz": [[1.0, 2.0, 3.0]]}, 422, "invalid_input", ["steps", "required"]),
    ({"steps": [[1.0, 2.0, 3.0]], "start": -1}, 422, "invalid_input", ["start"]),
    ({"steps": [[1.0, 2.0, 3.0]], "start": False}, 422, "invalid_input", ["start", "integer"]),  # not step 0
    ({"steps": [[True, False, True]]}, 422, "invalid_input", ["steps", "booleans"]),
    ({"steps": [[0.5, 0.5, 0.5], [0.5, True, 0.5]]}, 422, "invalid_input", ["steps", "boolean"]),  # numpy: 1.0
    ({"steps": [[1, False, 3]]}, 422, "invalid_input", ["steps", "boolean"]),  # numpy: 0
    ({"steps": [[1.0, 2.0, 3.0]], "start": 2**64}, 422, "invalid_input", ["start"]),  # past what the IPC carries
    ({"steps": [[1.0, 2.0, 3.0]], "start": 2**63}, 422, "invalid_input", ["start"]),  # past a signed 64-bit index
    ({"steps": [[10**400, 2.0, 3.0]]}, 422, "invalid_input", ["steps", "too large for any float"]),
    ({"steps": [[0.0, 0.0, 0.0]] * 65}, 413, "too_many_steps", ["steps", "65", "64"]),
]


@pytest.fixture
def session(client: httpx.Client) -> str:
    return client.post("/v1/sessions", json={"model": "sliding"}).json()["session_id"]


def _check(r: httpx.Response, status: int, code: str, words: list[str] = ()) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code
    for w in words:
        assert w in err["message"], (w, err["message"])


def test_bad_steps_are_refused_and_session_unharmed(client: httpx.Client, session: str, ref: Reference) -> None:
    x = ref.sequence("sliding", 4, seed=21)
    url = f"/v1/sessions/{session}/steps"
    client.post(url, json={"steps": x[:2].tolist()})
    for body, status, code, words in BAD_STEPS:
        _check(client.post(url, json=body), status, code, words)
    for raw in ('{"steps": [[NaN, 1, 2]]}', '{"steps": [[Infinity, 1, 2]]}'):
        _check(client.post(url, content=raw, headers={"content-type": "application/json"}), 422, "invalid_input",
               ["NaN or Inf"])
    r = client.post(url + "?start=0", json={"steps": x[:2].tolist()})  # a retry with start in the URL: not applied
    _check(r, 422, "invalid_input", ["start", "JSON body"])
    r = client.post(url, content=b"{not json", headers={"content-type": "application/json"})
    _check(r, 422, "invalid_input", ["body", "malformed JSON", "character 1"])
    assert r.json()["error"]["field"] == "body"  # not the character offset
    r = client.post(url, content=b'{"steps": [[0.5, "\xff", 0.5]]}', headers={"content-type": "application/json"})
    _check(r, 422, "invalid_input", ["body", "not valid UTF-8"])
    r = client.post(url, json={"steps": x[2:].tolist()})
    assert r.status_code == 200 and r.json()["start"] == 2
    assert_outputs(r.json()["outputs"], ref.outputs("sliding", x), start=2)
    assert 'psn_errors_total{code="invalid_input"}' in client.get("/metrics").text


def test_a_boolean_in_a_utf16_or_utf32_body_is_refused(client: httpx.Client, session: str) -> None:
    """JSON read from bytes may be UTF-16 or UTF-32 (json.loads tells them by their first bytes): a boolean
    there is not the bytes ``true``, and must still not run as 1.0."""
    url = f"/v1/sessions/{session}/steps"
    for enc in ("utf-16", "utf-16-le", "utf-32", "utf-32-be"):
        for path, body in ((url, {"steps": [[0.5, 0.5, 0.5], [0.5, True, 0.5]]}),
                           ("/v1/classify", {"model": "sliding", "steps": [[0.5, False, 0.5]]})):
            r = client.post(path, content=json.dumps(body).encode(enc), headers={"content-type": "application/json"})
            _check(r, 422, "invalid_input", ["steps", "boolean"])
    assert client.get(f"/v1/sessions/{session}").json()["steps_seen"] == 0  # nothing applied
    r = client.post(url, content=json.dumps({"steps": [[0.5, 1, 0.5]]}).encode("utf-16"),
                    headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json()["start"] == 0  # numbers in UTF-16 still run


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_json_body_without_a_json_content_type_is_refused_naming_the_header(client: httpx.Client, session: str,
                                                                            content_type: str | None) -> None:
    """FastAPI reads a body as JSON only under a JSON Content-Type (curl -d sends a form's, many HTTP libraries
    none): the body then reached the model as bytes and was refused as "body: Input should be a valid
    dictionary", of a body that is one. The refusal names Content-Type and what it must be."""
    headers = {"content-type": content_type} if content_type else {}
    for path, body in ((f"/v1/sessions/{session}/steps", {"steps": [[0.5, 0.5, 0.5]]}),
                       ("/v1/sessions", {"model": "sliding"}),
                       ("/v1/classify", {"model": "sliding", "steps": [[0.5] * 3]})):
        r = client.post(path, content=json.dumps(body).encode(), headers=headers)
        _check(r, 422, "invalid_input", ["Content-Type", "application/json", repr(content_type) if content_type
                                         else "none"])
        assert r.json()["error"]["field"] == "Content-Type"
    assert client.get(f"/v1/sessions/{session}").json()["steps_seen"] == 0  # nothing applied


def test_an_unknown_field_is_refused_naming_it_and_nothing_is_applied(client: httpx.Client, server: Server,
                                                                       ref: Reference) -> None:
    """A misspelt ``start`` would make a retry append its steps a second time: every request body and client
    message refuses a field it does not know (422 naming it and listing the ones it takes), not ignores it."""
    x = ref.sequence("sliding", 3, seed=25)
    sid = client.post("/v1/sessions", json={"model": "sliding"}).json()["session_id"]
    url = f"/v1/sessions/{sid}/steps"
    assert client.post(url, json={"steps": x[:2].tolist()}).json()["steps_seen"] == 2
    for bad in ("strat", "Start"):  # a retry of steps 0-1 with its index misspelt
        r = client.post(url, json={"steps": x[:2].tolist(), bad: 0})
        _check(r, 422, "invalid_input", [bad, "unknown field", "'steps', 'start'"])
        assert r.json()["error"]["field"] == bad
    assert client.get(f"/v1/sessions/{sid}").json()["steps_seen"] == 2  # not applied again
    r = client.post("/v1/sessions", json={"model": "sliding", "idle_timeout_s": 5})
    _check(r, 422, "invalid_input", ["idle_timeout_s", "unknown field", "'model'"])
    r = client.post("/v1/classify", json={"model": "sliding", "steps": x.tolist(), "label": 3})
    _check(r, 422, "invalid_input", ["label", "unknown field", "'model', 'steps'"])
    r = client.post(url, json={"steps": x[2:].tolist(), "start": 2})  # the same fields, spelt right
    assert r.status_code == 200, r.text
    assert_outputs(r.json()["outputs"], ref.outputs("sliding", x), start=2)
    with ws_client.connect(server.ws_url) as ws:
        def ask(msg: dict) -> dict:
            ws.send(json.dumps(msg))
            return json.loads(ws.recv(timeout=5))

        e = ask({"type": "open", "model": "sliding", "frame": "binary"})["error"]  # "frames"
        assert e["field"] == "frame" and "'type', 'model', 'frames'" in e["message"], e
        assert ask({"type": "open", "model": "sliding"})["type"] == "opened"
        assert ask({"type": "steps", "steps": x[:2].tolist()})["start"] == 0
        e = ask({"type": "steps", "steps": x[:2].tolist(), "Start": 0, "id": 4})
        assert e["id"] == 4 and e["error"]["field"] == "Start", e
        assert "'type', 'steps', 'start', 'id'" in e["error"]["message"]
        e = ask({"type": "close", "session": "x"})["error"]
        assert e["field"] == "session" and "expected only 'type'" in e["message"]
        r = ask({"type": "steps", "steps": x[2:].tolist()})  # nothing was applied twice: this is step 2
        assert r["start"] == 2 and r["replayed"] == 0
        assert_outputs(r["outputs"], ref.outputs("sliding", x), start=2)


def test_unknown_route_names_the_path(client: httpx.Client) -> None:
    r = client.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert r.json()["error"]["field"] == "path" and "/v1/nothing-here" in r.json()["error"]["message"]
    r = client.delete("/v1/models")  # a route that takes other methods
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    assert r.json()["error"]["field"] == "method" and "DELETE /v1/models" in r.json()["error"]["message"]


def test_a_stray_slash_is_not_found_not_redirected(client: httpx.Client, ref: Reference) -> None:
    """A path with a trailing slash is no route: 404 in the API's shape (under /v2 the protocol's), not an
    empty 307 to a Location built from the request's Host header; nothing is applied. The demo page takes
    /demo/ too."""
    sid = client.post("/v1/sessions", json={"model": "sliding"}).json()["session_id"]
    x = ref.sequence("sliding", 1, seed=23)
    for method, path, body in (("POST", f"/v1/sessions/{sid}/steps/", {"steps": x.tolist()}),
                               ("POST", "/v1/sessions/", {"model": "sliding"}),
                               ("GET", f"/v1/sessions/{sid}/", None), ("GET", "/v1/models/", None),
                               ("POST", "/v1/classify/", {"model": "sliding", "steps": x.tolist()})):
        r = client.request(method, path, json=body, headers={"host": "app.localhost"})
        assert r.status_code == 404 and "location" not in r.headers, (path, r.status_code, r.headers)
        assert r.json()["error"]["code"] == "not_found" and r.json()["error"]["field"] == "path"
    r = client.post("/v2/models/sliding/infer/", json={"inputs": []})
    assert r.status_code == 404 and isinstance(r.json()["error"], str) and "location" not in r.headers
    assert client.get(f"/v1/sessions/{sid}").json()["steps_seen"] == 0
    assert client.get("/demo/").status_code == 200 and "text/html" in client.get("/demo/").headers["content-type"]


def test_head_is_a_get_without_its_body(client: httpx.Client) -> None:
    """Every GET route answers HEAD (load balancers probe /healthz with it): the GET's status and headers,
    Content-Length included, and no body; HEAD where only POST is allowed is the GET's 405."""
    sid = client.post("/v1/sessions", json={"model": "sliding"}).json()["session_id"]
    for path in ("/healthz", "/readyz", "/v1/models", "/v1/models/sliding", f"/v1/sessions/{sid}", "/v2/health/ready",
                 "/v2/models/sliding", "/demo"):
        get, head = client.get(path), client.head(path)
        assert head.status_code == get.status_code == 200 and head.content == b"", (path, head.status_code)
        if "sessions" not in path:  # a session's answer holds the seconds until its expiry: its length varies
            assert head.headers["content-length"] == get.headers["content-length"] == str(len(get.content))
        assert head.headers["content-type"] == get.headers["content-type"]
    r = client.head("/v1/classify")
    assert r.status_code == 405 and r.content == b"" and client.get("/v1/classify").status_code == 405
    assert client.head("/nope").status_code == 404


def test_a_wrong_method_is_405_with_every_allowed_method(client: httpx.Client) -> None:
    """RFC 9110: a 405 lists in Allow every method the path takes, over all its routes (GET and DELETE on a
    session, where Starlette's own header named only the first route's), and the message says it too."""
    sid = client.post("/v1/sessions", json={"model": "sliding"}).json()["session_id"]
    for method, path, allowed in (("PUT", f"/v1/sessions/{sid}", "DELETE, GET, HEAD"),
                                  ("GET", f"/v1/sessions/{sid}/steps", "POST"), ("DELETE", "/v1/models", "GET, HEAD"),
                                  ("PATCH", "/v1/sessions", "POST"), ("GET", "/v2/models/sliding/infer", "POST")):
        r = client.request(method, path)
        assert r.status_code == 405 and r.headers["allow"] == allowed, (method, path, r.headers)
        err = r.json()["error"]
        message = err if isinstance(err, str) else err["message"]  # /v2: the protocol's shape
        assert message.endswith(f"allowed: {allowed}"), message
    assert client.get(f"/v1/sessions/{sid}").json()["steps_seen"] == 0


def _read_to_eof(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_a_request_then_a_half_close_is_answered(server: Server, client: httpx.Client, ref: Reference) -> None:
    """A client that shuts down its sending side after a whole request (shutdown(SHUT_WR), ``nc -N``) still
    gets the answer, then the connection closes. asyncio closed such a connection at once: the steps were
    applied and their answer lost. A body cut short by the half-close is never applied."""
    sid = client.post("/v1/sessions", json={"model": "sliding"}).json()["session_id"]
    x = ref.sequence("sliding", 3, seed=24)
    for t in range(3):
        body = json.dumps({"steps": x[t:t + 1].tolist()}).encode()
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(f"POST /v1/sessions/{sid}/steps HTTP/1.1\r\nhost: localhost\r\n"
                         "content-type: application/json\r\n"
                         f"content-length: {len(body)}\r\n\r\n".encode() + body)
            sock.shutdown(socket.SHUT_WR)
            head, _, answer = _read_to_eof(sock).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        assert_outputs(json.loads(answer)["outputs"], ref.outputs("sliding", x), start=t)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"POST /v1/sessions/{sid}/steps HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
                     "content-length: 100\r\n\r\n{\"steps\": ".encode())
        sock.shutdown(socket.SHUT_WR)
        assert _read_to_eof(sock) == b""  # closed, not left waiting for the rest of the body
    assert client.get(f"/v1/sessions/{sid}").json()["steps_seen"] == 3


def test_unknown_things(client: httpx.Client) -> None:
    _check(client.post("/v1/sessions", json={"model": "nope"}), 404, "model_not_found", ["model", "nope", "sliding"])
    _check(client.get("/v1/models/nope"), 404, "model_not_found")
    _check(client.post("/v1/classify", json={"model": "nope", "steps": [[1, 2, 3]]}), 404, "model_not_found")
    _check(client.post("/v1/classify", json={"model": "sliding", "steps": [[0.5, True, 0.5]]}), 422, "invalid_input",
           ["steps", "boolean"])  # numpy would read it as 1.0
    _check(client.post("/v1/sessions/nope/steps", json={"steps": [[1, 2, 3]]}), 404, "session_not_found")
    _check(client.delete("/v1/sessions/nope"), 404, "session_not_found")
    _check(client.post("/v1/sessions", json={"model": "full"}), 409, "model_cannot_stream", ["classify"])
    _check(client.get("/v1/nothing-here"), 404, "not_found")


def test_horizon(client: httpx.Client, ref: Reference) -> None:
    sid = client.post("/v1/sessions", json={"model": "masked"}).json()
    assert sid["horizon"] == 24
    x = ref.sequence("masked", 24, seed=22)
    url = f"/v1/sessions/{sid['session_id']}/steps"
    client.post(url, json={"steps": x[:20].tolist()})
    _check(client.post(url, json={"steps": x[:5].tolist()}), 422, "past_horizon", ["T=24", "at most 4"])
    r = client.post(url, json={"steps": x[20:].tolist()})
    assert_outputs(r.json()["outputs"], ref.outputs("masked", x), start=20)
    _check(client.post(url, json={"steps": x[:1].tolist()}), 422, "past_horizon")
    _check(client.post("/v1/classify", json={"model": "masked", "steps": [[0, 0, 0]] * 25}), 422, "past_horizon")
    _check(client.post("/v1/classify", json={"model": "full", "steps": [[0, 0, 0]] * 5}), 422, "invalid_input",
           ["T=6"])


def test_request_too_large(serve) -> None:
    srv = serve(max_request_bytes=2048)
    with httpx.Client(base_url=srv.url) as c:
        sid = c.post("/v1/sessions", json={"model": "sliding"}).json()["session_id"]
        big = {"steps": [[0.123456789, 0.123456789, 0.123456789]] * 100}
        _check(c.post(f"/v1/sessions/{sid}/steps", json=big), 413, "request_too_large", ["2048"])

        def chunked():  # no content-length: counted while read
            yield json.dumps(big).encode()

        _check(c.post(f"/v1/sessions/{sid}/steps", content=chunked(), headers={"content-type": "application/json"}),
               413, "request_too_large")
        assert c.post(f"/v1/sessions/{sid}/steps", json={"steps": [[0, 0, 0]]}).status_code == 200
    with ws_client.connect(srv.ws_url) as ws:
        ws.send(json.dumps({"type": "open", "model": "sliding"}))
        json.loads(ws.recv())
        ws.send(json.dumps({"type": "steps", **big}))
        assert json.loads(ws.recv())["error"]["code"] == "request_too_large"
        ws.send(json.dumps({"type": "steps", "steps": [[0, 0, 0]]}))
        assert json.loads(ws.recv())["type"] == "steps"


def not_json(constant: str) -> None:
    raise AssertionError(f"{constant} in an answer: not JSON (a browser's JSON.parse throws on it)")


def test_ws_errors_keep_the_connection(server: Server, ref: Reference) -> None:
    x = ref.sequence("sliding", 3, seed=23)
    with ws_client.connect(server.ws_url) as ws:
        def ask(msg) -> dict:
            ws.send(msg if isinstance(msg, str | bytes) else json.dumps(msg))
            return json.loads(ws.recv(timeout=5), parse_constant=not_json)  # answers are plain JSON

        assert ask({"type": "steps", "steps": x.tolist()})["error"]["code"] == "invalid_input"  # no session yet
        assert ask("not json")["error"]["code"] == "invalid_input"
        assert ask(b"\x00\x01")["error"]["code"] == "invalid_input"
        assert ask({"type": "dance"})["error"]["code"] == "invalid_input"
        assert ask({"type": "open", "model": "nope"})["error"]["code"] == "model_not_found"
        assert ask({"type": "open", "model": "full"})["error"]["code"] == "model_cannot_stream"
        assert ask({"type": "attach", "session_id": "nope"})["error"]["code"] == "session_not_found"
        assert ask({"type": "open", "model": "sliding"})["type"] == "opened"
        e = ask({"type": "steps", "steps": [[1, 2]], "id": 9})
        assert e["error"]["code"] == "invalid_input" and e["id"] == 9 and "(L, 3)" in e["error"]["message"]
        assert ask({"type": "steps", "steps": [[1, "x", 2]]})["error"]["code"] == "invalid_input"
        e = ask({"type": "steps", "steps": [[0.5, True, 0.5]]})
        assert e["error"]["code"] == "invalid_input" and "boolean" in e["error"]["message"]
        assert ask('{"type": "steps", "steps": [[NaN, 1, 2]]}')["error"]["code"] == "invalid_input"
        assert ask({"type": "steps", "steps": [[0, 0, 0]] * 65})["error"]["code"] == "too_many_steps"
        e = ask('{"type": "steps", "steps": [[0, 0, 0]], "id": NaN}')  # Python reads NaN; JSON has none
        assert e["error"]["field"] == "id" and "NaN" in e["error"]["message"] and e["id"] is None
        assert ask('{"type": "steps", "steps": [[0, 0, 0]], "id": {"a": [1e400]}}')["error"]["field"] == "id"
        assert ask('{"type": "dance", "id": -Infinity}')["id"] is None  # not echoed
        e = ask('{"type": "steps", "steps": [[0, 0, 0]], "id": "\\ud800"}')  # a lone surrogate: the parser refuses
        assert e["error"]["field"] == "message" and e["id"] is None  # it, so it is not echoed (strict parsers fail)
        e = ask({"type": "steps", "steps": [[0, 0, 0]], "start": 2**64, "id": 10})
        assert e["error"]["code"] == "invalid_input" and e["error"]["field"] == "start" and e["id"] == 10
        e = ask({"type": "steps", "steps": [[0, 0, 0]], "start": -1, "id": 11})
        assert e["error"]["code"] == "invalid_input" and e["error"]["field"] == "start" and e["id"] == 11
        r = ask({"type": "steps", "steps": x.tolist()})
        assert_outputs(r["outputs"], ref.outputs("sliding", x))


def test_start_is_an_integer_up_to_2_63_minus_1_and_frames_json_or_binary(client: httpx.Client, server: Server,
                                                                           ref: Reference) -> None:
    """docs/api.md: ``start`` is an integer from 0 to 2^63 - 1, booleans are not integers, over HTTP and the
    WebSocket alike; the largest is taken (a step_gap on a new session), one past it refused. ``frames`` is json
    or binary: another word is refused, not taken for json."""
    x = ref.sequence("sliding", 1, seed=26).tolist()
    sid = client.post("/v1/sessions", json={"model": "sliding"}).json()["session_id"]
    _check(client.post(f"/v1/sessions/{sid}/steps", json={"steps": x, "start": 2**63 - 1}), 409, "step_gap")
    with ws_client.connect(server.ws_url) as ws:
        def ask(msg: dict) -> dict:
            ws.send(json.dumps(msg))
            return json.loads(ws.recv(timeout=5))

        e = ask({"type": "open", "model": "sliding", "frames": "xml"})["error"]
        assert e["code"] == "invalid_input" and e["field"] == "frames", e
        assert ask({"type": "open", "model": "sliding", "frames": "json"})["type"] == "opened"
        e = ask({"type": "steps", "steps": x, "start": 2**63 - 1, "id": 1})
        assert e["error"]["code"] == "step_gap" and e["id"] == 1, e
        for bad in (2**63, False, 0.0, "0"):  # past a signed 64-bit index; not integers (each would be step 0)
            e = ask({"type": "steps", "steps": x, "start": bad, "id": 2})
            assert e["error"]["code"] == "invalid_input" and e["error"]["field"] == "start", (bad, e)
        r = ask({"type": "steps", "steps": x, "start": 0})  # nothing was applied
        assert r["start"] == 0 and r["replayed"] == 0, r


def test_queue_full(serve, ref: Reference) -> None:
    srv = serve(queue_depth=2, max_wait_ms=400, max_batch_size=64)
    x = ref.sequence("sliding", 1, seed=24).tolist()

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=srv.url, timeout=20) as c:
            ids = [(await c.post("/v1/sessions", json={"model": "sliding"})).json()["session_id"] for _ in range(6)]
            return await asyncio.gather(*(c.post(f"/v1/sessions/{i}/steps", json={"steps": x}) for i in ids))

    rs = asyncio.run(main())
    codes = sorted(r.status_code for r in rs)
    assert codes.count(200) == 2 and codes.count(503) == 4, codes
    for r in rs:
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "queue_full" and r.headers["Retry-After"] == "1"


@pytest.mark.parametrize(("dtype", "big"), [("float32", 1e39), ("float16", 70000.0)])
def test_finite_numbers_beyond_the_model_dtype_are_refused(serve, dtype: str, big: float) -> None:
    """A finite JSON number that would become inf in the model's dtype is a 422 everywhere, not a 500."""
    srv = serve(dtype=dtype)
    with httpx.Client(base_url=srv.url, timeout=20) as c:
        sid = c.post("/v1/sessions", json={"model": "sliding"}).json()["session_id"]
        for url, body in ((f"/v1/sessions/{sid}/steps", {"steps": [[big, 0.0, 0.0]]}),
                          ("/v1/classify", {"model": "sliding", "steps": [[0.0, -big, 0.0]]})):
            _check(c.post(url, json=body), 422, "invalid_input", ["steps", dtype])
        with ws_client.connect(srv.ws_url) as ws:
            ws.send(json.dumps({"type": "attach", "session_id": sid}))
            json.loads(ws.recv())
            ws.send(json.dumps({"type": "steps", "steps": [[0.0, 0.0, big]]}))
            err = json.loads(ws.recv())
            assert err["type"] == "error" and err["error"]["code"] == "invalid_input" and dtype in \
                err["error"]["message"]
        r = c.post(f"/v1/sessions/{sid}/steps", json={"steps": [[1.0, 0.5, -0.5]]})  # the session still works
        assert r.status_code == 200 and r.json()["start"] == 0, r.text


DEEP = "[" * 100_000 + "]" * 100_000  # deeper than any JSON parser here recurses


def test_deeply_nested_json_is_invalid_input(client: httpx.Client, server: Server, session: str) -> None:
    """Over HTTP a 422 naming the body (not a 400); over the WebSocket an error message, and the connection
    stays usable (it used to drop with 1006)."""
    json_headers = {"content-type": "application/json"}
    for url, body in ((f"/v1/sessions/{session}/steps", DEEP), (f"/v1/sessions/{session}/steps",
                      '{"steps": ' + DEEP + "}"), ("/v1/classify", '{"model": "sliding", "steps": ' + DEEP + "}"),
                      ("/v1/sessions", '{"model": ' + DEEP + "}")):
        r = client.post(url, content=body, headers=json_headers)
        _check(r, 422, "invalid_input", ["body", "nested too deeply"])
        assert r.json()["error"]["field"] == "body"
    r = client.post(f"/v1/sessions/{session}/steps", content=b"\xff\xfe[", headers=json_headers)
    _check(r, 422, "invalid_input", ["body"])
    with ws_client.connect(server.ws_url) as ws:
        ws.send(json.dumps({"type": "attach", "session_id": session}))
        assert json.loads(ws.recv(timeout=5))["type"] == "attached"
        for text in (DEEP, '{"type": "steps", "steps": ' + DEEP + "}", '{"type": "steps", "steps": [[0, 0, 0]], '
                     '"id": ' + DEEP + "}"):
            ws.send(text)
            err = json.loads(ws.recv(timeout=5))
            assert err["type"] == "error" and err["error"]["code"] == "invalid_input", err
            assert err["error"]["field"] == "message"
        ws.send("{not json")
        err = json.loads(ws.recv(timeout=5))["error"]
        assert err["field"] == "message" and "column 2" in err["message"]
        ws.send(json.dumps({"type": "steps", "steps": [[0, 0, 0]], "id": 3}))
        ok = json.loads(ws.recv(timeout=5))
        assert ok["type"] == "steps" and ok["id"] == 3 and ok["start"] == 0


def test_an_oversized_ws_message_is_refused_unparsed_and_the_connection_stays(server: Server) -> None:
    big_steps = {"type": "steps", "steps": [[0.25, 0.25, 0.25]] * 150_000}  # 3 MB: too_many_steps if parsed
    text = json.dumps(big_steps)
    assert 3_000_000 < len(text) < 4_000_000
    with ws_client.connect(server.ws_url, max_size=None) as ws:
        ws.send(json.dumps({"type": "open", "model": "sliding"}))
        json.loads(ws.recv(timeout=5))
        ws.send(text)
        err = json.loads(ws.recv(timeout=30))
        assert err["error"]["code"] == "request_too_large" and err["error"]["field"] == "message", err
        ws.send(json.dumps({"type": "steps", "steps": [[0, 0, 0]]}))
        assert json.loads(ws.recv(timeout=5))["start"] == 0
    with ws_client.connect(server.ws_url, subprotocols=["psn.binary.v1"], max_size=None) as ws:
        ws.send(json.dumps({"type": "open", "model": "sliding"}))
        json.loads(ws.recv(timeout=5))
        frame = struct.pack("<IIq", 7, 1, -1) + bytes(3_000_000)  # L=1 with 3 MB: a length error if parsed
        ws.send(frame)
        err = json.loads(ws.recv(timeout=30))
        assert err["error"]["code"] == "request_too_large" and err["id"] == 7, err
        ws.send(struct.pack("<IIq", 8, 1, -1) + np.zeros(3, "<f4").tobytes())
        assert struct.unpack_from("<IIq", ws.recv(timeout=5)) == (8, 1, 0)
    with ws_client.connect(server.ws_url) as ws:  # past the frame limit (4 MiB here): refused from its header
        with pytest.raises(ConnectionClosed) as e:
            ws.send(bytes(5 << 20))
            ws.recv(timeout=30)
        # code 1009, when the close frame arrives before the reset of the half-sent message
        assert e.value.rcvd is None or e.value.rcvd.code == 1009


def test_a_start_past_64_bits_is_refused_alone_and_other_requests_are_answered(server: Server) -> None:
    """A start of 2**64 once passed validation and could not be packed for the engine core: every request
    of that front-end turn was lost (504 after the request timeout), 190 of 195 good ones in an outside
    run. Now it is a 422 at once, and the good requests sent with it are answered; integers past 64 bits
    in steps are numbers (2**64 is a fine float)."""
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=15) as c:
            sids = [(await c.post("/v1/sessions", json={"model": "sliding"})).json()["session_id"] for _ in range(24)]
            bodies = [{"steps": [[2**64, 0, 0]], **({"start": 2**64} if i % 6 == 0 else {})} for i in range(24)]
            return await asyncio.gather(*(c.post(f"/v1/sessions/{sid}/steps", json=b)
                                          for sid, b in zip(sids, bodies, strict=True)))

    answers = asyncio.run(run())
    for i, r in enumerate(answers):
        if i % 6 == 0:
            _check(r, 422, "invalid_input", ["start"])
        else:
            assert r.status_code == 200 and r.json()["start"] == 0, r.text


def test_a_request_the_ipc_cannot_carry_fails_alone_not_its_whole_turn() -> None:
    """The front end's engine client sends each event-loop turn's requests as one frame: one value that
    msgpack cannot pack (validation should have refused it) fails that request with a 422, and the turn's
    other requests still reach the engine core (here the other end of a real Unix socket pair)."""
    import socket

    from service.errors import InvalidInput
    from service.frontend.client import EngineClient
    from service.ipc import LENGTH, unpack

    async def run() -> tuple[list, BaseException | None]:
        ours, theirs = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=ours)
        client = EngineClient("unix:/nowhere")
        client._writer = writer
        good = [client._call("steps", "s1", None, 1, b"\0" * 4), client._call("get", "s2")]
        bad = client._call("steps", "s3", 2**64, 1, b"\0" * 4)
        await asyncio.sleep(0.05)  # the turn ends: one flush
        theirs.setblocking(False)
        data = theirs.recv(1 << 16)
        (n,) = LENGTH.unpack_from(data)
        sent = unpack(data[LENGTH.size:LENGTH.size + n])
        error = bad.exception() if bad.done() else None
        assert not any(f.done() for f in good)  # still waiting for their answers
        for f in good:
            f.cancel()
        writer.close()
        theirs.close()
        return sent, error

    sent, error = asyncio.run(run())
    assert [item[1:3] for item in sent] == [["steps", "s1"], ["get", "s2"]]  # the bad one left out, nothing else
    assert isinstance(error, InvalidInput) and error.field == "request", error


@pytest.mark.parametrize(("after", "seconds"), [(0.3, 1), (1, 1), (2.4, 2), (2.6, 3), (30.0, 30)])
def test_retry_after_is_whole_seconds_and_never_0(after: float, seconds: int) -> None:
    """Retry-After is whole seconds (HTTP's delta-seconds), the same in a WebSocket error; a wait under a
    second is 1, never 0 (which says: retry at once). An error where waiting does not help has neither."""
    err = TooManySessions("sessions: all in use", retry_after=after)  # e.g. min(PSN_IDLE_TIMEOUT_S, 30)
    assert err.headers() == {"Retry-After": str(seconds)} and err.ws_error()["retry_after"] == seconds
    plain = InvalidInput("steps: bad", field="steps")
    assert plain.headers() == {} and plain.ws_error() == {"code": "invalid_input", "message": "steps: bad",
                                                          "field": "steps"}


def test_without_keys_a_second_authorization_header_is_nobodys_business(client: httpx.Client) -> None:
    r = client.post("/v1/sessions", json={"model": "sliding"},
                    headers=[("Authorization", "Bearer one"), ("Authorization", "Basic two")])
    assert r.status_code == 201, r.text
