"""The backend contract of ``service/backends/base.py``, checked on the torch backend directly."""

from __future__ import annotations

import torch

from service.backends import BACKENDS, get_backend_class
from tests.service.conftest import Reference


def test_registry() -> None:
    assert {"torch", "onnx"} <= set(BACKENDS)
    assert get_backend_class("torch").__name__ == "TorchBackend"


def test_run_over_scattered_slots_equals_parallel_form(ref: Reference) -> None:
    for name in ("sliding", "masked", "conv", "lif"):
        model = ref.models[name]
        be = get_backend_class("torch")(model, 8)
        slots = torch.tensor([5, 1, 6])  # not in order, not contiguous
        be.reset(slots)
        xs = [ref.sequence(name, 9, seed=50 + i) for i in range(3)]
        x = torch.stack(xs, dim=1)  # (9, 3, *input_shape)
        outs = [be.run(x[:2], slots), be.run(x[2:3], slots), be.run(x[3:9], slots)]  # chunks of 2, 1, 6
        spikes = torch.cat([o[0] for o in outs])
        scores = torch.cat([o[1] for o in outs])
        want = model.net(x)
        assert torch.equal(spikes, want.spikes), name
        torch.testing.assert_close(scores, want.scores, rtol=1e-12, atol=1e-12)
        # only the rows asked for move: slot 1 continues alone, slots 5 and 6 are untouched
        more = ref.sequence(name, 2, seed=60).unsqueeze(1)
        be.run(more, torch.tensor([1]))
        cont = be.run(x[:1, :1] * 0 + 1, torch.tensor([5]))[1]
        alone = model.net(torch.cat([xs[0], torch.ones(1, *xs[0].shape[1:], dtype=xs[0].dtype)]).unsqueeze(1))
        torch.testing.assert_close(cont[0, 0], alone.scores[-1, 0], rtol=1e-12, atol=1e-12)
        # reset gives a fresh session
        be.reset(torch.tensor([1]))
        again = be.run(x[:2, :1], torch.tensor([1]))
        assert torch.equal(again[0], want.spikes[:2, :1])


def test_classify_and_shapes(ref: Reference) -> None:
    model = ref.models["conv"]
    be = get_backend_class("torch")(model, 2)
    x = ref.sequence("conv", 5, seed=70).unsqueeze(1)
    spikes, scores = be.classify(x)
    assert spikes.shape == (5, 1, 7) and scores.shape == (5, 1, 4) and spikes.device.type == "cpu"
    assert get_backend_class("torch")(ref.models["full"], 4).max_slots == 0  # plain PSN: classify only
