"""A model trained with ``psn train --data`` on variable-length sequences is served: streaming each test
sequence (its true length) over HTTP, classifying it, and the folder's stored predictions all agree."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from model.cli import main as psn_main
from tests.test_datafile import FAST, write_npz


@pytest.fixture(scope="module")
def user_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("user-models")
    data = write_npz(root.parent / "tones.npz", variable=True)
    assert psn_main(["train", "--data", str(data), *FAST, "--out", str(root / "tones")]) == 0
    return root


def test_served_user_model_streams_and_classifies_like_its_reference(serve, user_root: Path) -> None:
    srv = serve(model_dir=user_root, dtype="float32")
    ref = json.loads((user_root / "tones" / "reference.json").read_text())
    with httpx.Client(base_url=srv.url, timeout=20) as c:
        info = c.get("/v1/models/tones").json()
        assert info["class_names"] == ["low", "mid", "high"] and info["input_shape"] == [2]
        for i, n in enumerate(ref["lengths"]):
            steps = [ref["x"][t][i] for t in range(n)]  # the sequence without its padding
            sid = c.post("/v1/sessions", json={"model": "tones"}).json()["session_id"]
            streamed = c.post(f"/v1/sessions/{sid}/steps", json={"steps": steps}).json()["outputs"]
            whole = c.post("/v1/classify", json={"model": "tones", "steps": steps}).json()
            assert len(streamed) == n
            assert streamed[-1]["predicted"] == whole["predicted"] == ref["predictions"][i]
            assert streamed[-1]["scores"] == pytest.approx(ref["scores"][i], abs=1e-4)
            assert whole["scores"] == pytest.approx(ref["scores"][i], abs=1e-4)
            assert whole["label"] == ["low", "mid", "high"][ref["predictions"][i]]
