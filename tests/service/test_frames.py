"""Binary frames on WS /v1/stream (docs/api.md): identical outputs to JSON frames, clear errors for
malformed frames, and the connection stays usable. The frames are built and read here with ``struct``
straight from the documented layout, not with the service's codec."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
from websockets.sync.client import connect

from tests.service.conftest import Reference, Server

SUBPROTOCOL = "psn.binary.v1"


def frame(x: np.ndarray, msg_id: int = 0, start: int = -1) -> bytes:
    """Request: u32 id, u32 L, i64 start, then L * input_size float32, little-endian."""
    return struct.pack("<IIq", msg_id, x.shape[0], start) + x.astype("<f4").tobytes()


def read_answer(data: bytes) -> dict:
    """Answer: 32-byte header, scores f32 (L, C), predicted i32 (L,), spikes bit-packed (L, ceil(n/8))."""
    msg_id, L, start, replayed, n_out, classes, nb = struct.unpack_from("<IIqIIII", data)
    off = 32
    scores = np.frombuffer(data, "<f4", L * classes, off).reshape(L, classes)
    off += 4 * L * classes
    predicted = np.frombuffer(data, "<i4", L, off)
    off += 4 * L
    packed = np.frombuffer(data, np.uint8, L * nb, off).reshape(L, nb)
    assert off + L * nb == len(data) and nb == math.ceil(n_out / 8)
    spikes = [[(row[i // 8] >> (i % 8)) & 1 for i in range(n_out)] for row in packed]
    return {"id": msg_id, "L": L, "start": start, "replayed": replayed, "scores": scores, "predicted": predicted,
            "spikes": spikes}


def _open(ws, model: str, **extra) -> dict:
    ws.send(json.dumps({"type": "open", "model": model, **extra}))
    msg = json.loads(ws.recv())
    assert msg["type"] == "opened", msg
    return msg["session"]


@pytest.mark.parametrize("model", ["sliding", "conv", "masked"])
def test_binary_and_json_frames_give_identical_outputs(server: Server, ref: Reference, model: str) -> None:
    x = ref.sequence(model, 13, seed=70)
    flat = x.reshape(13, -1).numpy()
    spikes_ref, scores_ref = ref.outputs(model, x)
    chunks = [(0, 1), (1, 5), (6, 2), (8, 5)]
    with connect(server.ws_url, subprotocols=[SUBPROTOCOL]) as wb, connect(server.ws_url) as wj:
        assert wb.subprotocol == SUBPROTOCOL
        _open(wb, model)
        _open(wj, model)
        for i, (start, L) in enumerate(chunks):
            wb.send(frame(flat[start:start + L], msg_id=100 + i))
            b = read_answer(wb.recv())
            wj.send(json.dumps({"type": "steps", "steps": x[start:start + L].tolist()}))
            j = json.loads(wj.recv())
            assert (b["id"], b["L"], b["start"], b["replayed"]) == (100 + i, L, start, 0)
            for k, o in enumerate(j["outputs"]):
                t = start + k
                n_out = len(np.asarray(o["spikes"]).ravel())
                assert b["spikes"][k] == np.asarray(o["spikes"]).ravel().tolist() == \
                    np.asarray(spikes_ref[t]).ravel().tolist()[:n_out], f"spikes differ at step {t}"
                # binary scores are float32 of the same numbers
                assert b["scores"][k].tolist() == np.float32(o["scores"]).tolist()
                assert b["scores"][k] == pytest.approx(scores_ref[t], rel=1e-6, abs=1e-6)
                assert b["predicted"][k] == o["predicted"]


def test_binary_chosen_on_open_and_retries(server: Server, ref: Reference) -> None:
    x = ref.sequence("sliding", 6, seed=71).numpy()
    with connect(server.ws_url) as ws:
        _open(ws, "sliding", frames="binary")
        ws.send(frame(x[:4], 1))
        a = read_answer(ws.recv())
        ws.send(frame(x[2:6], 2, start=2))  # steps 2, 3 again (replayed) and 4, 5 new
        b = read_answer(ws.recv())
        assert (b["start"], b["replayed"], b["L"]) == (2, 2, 4)
        assert b["spikes"][:2] == a["spikes"][2:] and (b["scores"][:2] == a["scores"][2:]).all()
        spikes_ref, _ = ref.outputs("sliding", ref.sequence("sliding", 6, seed=71))
        assert b["spikes"][2:] == spikes_ref[4:]


def test_malformed_binary_frames_get_error_frames_and_connection_stays_usable(server: Server,
                                                                              ref: Reference) -> None:
    x = ref.sequence("sliding", 3, seed=72).numpy()  # input_shape (3,)
    bad = [
        (b"\x01\x02", "frame", "header"),
        (struct.pack("<IIq", 5, 0, -1), "L", "at least one step"),
        (struct.pack("<IIq", 6, 2, -1) + x[:1].astype("<f4").tobytes(), "frame", "need"),
        (struct.pack("<IIq", 7, 100, -1) + np.zeros((100, 3), "<f4").tobytes(), "L", "at most 64"),
        (struct.pack("<IIq", 8, 1, -5) + x[:1].astype("<f4").tobytes(), "start", "-1 to append"),
        (struct.pack("<IIq", 9, 1, -1) + np.array([[np.nan, 0, 0]], "<f4").tobytes(), "steps", "NaN"),
        (frame(x[:1], 10, start=7), "start", "missing"),
    ]
    with connect(server.ws_url, subprotocols=[SUBPROTOCOL]) as ws:
        ws.send(frame(x[:1], 1))  # no session yet
        err = json.loads(ws.recv())
        assert err["type"] == "error" and err["error"]["field"] == "type" and err["id"] == 1
        _open(ws, "sliding")
        for data, field, words in bad:
            ws.send(data)
            err = json.loads(ws.recv())
            assert err["type"] == "error" and err["error"]["field"] == field, err
            assert words in err["error"]["message"], err
            if len(data) >= 16:
                assert err["id"] == struct.unpack_from("<I", data)[0]
        ws.send(json.dumps({"type": "steps", "steps": x[:1].tolist()}))  # JSON steps on a binary connection
        err = json.loads(ws.recv())
        assert err["type"] == "error" and "binary" in err["error"]["message"]
        assert err["error"]["field"] == "type" and err["error"]["message"].startswith("type: "), err  # names its field
        ws.send(frame(x, 11))  # still usable, and nothing above was applied
        ok = read_answer(ws.recv())
        assert (ok["id"], ok["start"], ok["L"]) == (11, 0, 3)
    with connect(server.ws_url) as ws:  # a binary frame on a JSON connection
        _open(ws, "sliding")
        ws.send(frame(x[:1], 12))
        err = json.loads(ws.recv())
        assert err["type"] == "error" and SUBPROTOCOL in err["error"]["message"] and err["id"] == 12
