"""Models, health, readiness, metrics and the OpenAPI document."""

from __future__ import annotations

import json
import socket

import httpx
from prometheus_client.parser import text_string_to_metric_families


def test_models(client: httpx.Client) -> None:
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert set(models) == {"sliding", "masked", "conv", "lif", "full"}
    m = client.get("/v1/models/conv").json()
    assert m["input_shape"] == [2, 5] and m["output_shape"] == [7] and m["k"] == 2 and m["horizon"] is None
    assert m["class_names"] == ["w", "x", "y", "z"] and m["streams"] is True
    assert models["masked"]["horizon"] == 24 and models["full"]["streams"] is False


def test_health_ready_metrics(client: httpx.Client) -> None:
    h = client.get("/healthz").json()
    assert h["status"] == "ok" and h["worker"] in (0, 1) and h["pid"] > 0
    # what docs/api.md lists, no more: it said "models": [] while every model was served (that is /readyz's field)
    assert set(h) == {"status", "worker", "pid", "engine_pid", "replica"} and h["replica"] is None, h
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready"
    assert r.json()["session_store"] is None  # no PSN_STATE_DIR / PSN_STATE_URL here
    assert client.get("/v1/models/nope").status_code == 404
    text = client.get("/metrics").text
    for name in ("psn_sessions", "psn_queue_depth", "psn_batch_size", "psn_step_latency_seconds",
                 'psn_errors_total{code="model_not_found"}', "psn_ws_connections"):
        assert name in text


def test_openapi_has_examples(client: httpx.Client) -> None:
    doc = client.get("/openapi.json").json()
    for path in ("/v1/models", "/v1/sessions", "/v1/sessions/{session_id}/steps", "/v1/classify", "/readyz"):
        assert path in doc["paths"]
    text = str(doc)
    assert "example" in text and "ErrorResponse" in text


def _raw(port: int, data: bytes) -> tuple[int, str]:
    """Send ``data`` on a fresh connection and read until the server closes it: the answer's status and code."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(data)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head[9:12]), json.loads(body)["error"]["code"]


def errors_total(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", headers={"connection": "close"}).text
    return {s.labels["code"]: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "psn_errors_total"}


def test_refusals_made_before_the_app_runs_count_in_psn_errors_total(serve) -> None:
    """What uvicorn's protocols refuse (an oversized head, a request or WebSocket handshake that does not parse, a
    request that did not come in whole in time) was answered in the API's shape but never counted: an operator
    watching psn_errors_total saw none of it. Summed over both front ends, whichever took each connection."""
    srv = serve(workers=2, read_timeout_s=1.0)
    before = errors_total(srv.url)
    ws = (b"Host: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")
    requests = [b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Pad: " + b"a" * 40_000 + b"\r\n\r\n",  # 431
                b"POST /v1/classify HTTP/1.1\r\nHost: localhost\r\nContent-Length: -1\r\n\r\n",  # 400
                b"GET /v1/stream?session_id=" + b"z" * 9000 + b" HTTP/1.1\r\n" + ws + b"\r\n",  # 414
                b"GET /v1/stream HTTP/1.1\r\n" + ws.replace(b"Sec-WebSocket-Key", b"X-Key") + b"\r\n",  # 400
                b"GET /v1/stream HTTP/1.1\r\n" + ws + b"Sec-WebSocket-Protocol: psn.json.v1, @@\r\n\r\n",  # 400
                b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n"] * 2  # 408: the head never ends
    sent: dict[str, int] = {}
    for data in requests:
        status, code = _raw(srv.port, data)
        assert status >= 400, (status, code)
        sent[code] = sent.get(code, 0) + 1
    assert set(sent) == {"headers_too_large", "bad_request", "url_too_long", "read_timeout"}, sent
    after = errors_total(srv.url)
    assert {code: n - before.get(code, 0) for code, n in after.items() if n != before.get(code, 0)} == sent
