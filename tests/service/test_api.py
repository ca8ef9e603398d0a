"""Models, health, readiness, metrics and the OpenAPI document."""

from __future__ import annotations

import httpx


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
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready"
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
