"""The optional fused Triton forward equals the PyTorch parallel form (runs where Triton is installed:
on a GPU, or on a CPU under TRITON_INTERPRET=1)."""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")

from model import MaskedPSN, SlidingPSN  # noqa: E402
from model.functional import NeuronState  # noqa: E402
from model.kernels import psn_forward_banded, psn_forward_fused  # noqa: E402
from model.network import LayerConfig, NetConfig, NetState, PSNNet  # noqa: E402
from tests.nets import make_spiking  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton on a CPU needs TRITON_INTERPRET=1", allow_module_level=True)


@pytest.mark.parametrize("T,N", [(8, 300), (33, 257), (64, 1000)])
def test_fused_forward_matches_parallel_form(T: int, N: int) -> None:
    torch.manual_seed(T)
    for neuron in (MaskedPSN(3, T), SlidingPSN(5)):
        neuron = neuron.to(DEVICE)
        x = torch.randn(T, N, device=DEVICE)
        with torch.no_grad():
            h = neuron.membrane(x)
            s = psn_forward_fused(x, neuron.effective_weight(T), neuron.bias)
        away = h.abs() > 1e-4
        assert torch.equal(s[away], (h[away] >= 0).float())
        assert 0 < s.mean() < 1


@pytest.mark.parametrize("T,N,k", [(8, 300, 1), (33, 257, 5), (64, 1000, 8), (5, 70, 5)])
def test_banded_forward_matches_parallel_form(T: int, N: int, k: int) -> None:
    """The banded kernel (k shifted multiply-adds) against the PyTorch (T, T) product, both neuron kinds."""
    torch.manual_seed(100 + T)
    for neuron in (MaskedPSN(k, T), SlidingPSN(k, exp_init=False)):
        neuron = neuron.to(DEVICE)
        x = torch.randn(T, N, device=DEVICE)
        with torch.no_grad():
            h = neuron.membrane(x)
            s = psn_forward_banded(x, neuron.band_weight(T), neuron.bias)
            via_forward = neuron(x)  # the module picks the banded kernel here
        away = h.abs() > 1e-4
        assert torch.equal(s[away], (h[away] >= 0).float())
        assert torch.equal(via_forward[away], s[away])
        assert 0 < s.mean() < 1



@pytest.mark.parametrize("layers,input_shape,k", [
    ((LayerConfig(out=16), LayerConfig(out=12)), (9,), 4),
    ((LayerConfig(kind="conv", out=3, kernel_size=3), LayerConfig(out=8)), (2, 5), 1),
])
def test_step_slots_in_place_matches_gathered_chunk(layers, input_shape, k) -> None:
    """The fused in-place slot step == gather the rows, ``chunk`` one step, scatter the new state back;
    rows not stepped stay untouched. Slots are unordered and at different step counts."""
    torch.manual_seed(k)
    cfg = NetConfig(input_shape=input_shape, num_classes=5, layers=layers, neuron="sliding", k=k)
    net = make_spiking(PSNNet(cfg), bn_mean=0.3, bn_affine=True).fused().to(DEVICE)
    S = 7
    with torch.no_grad():
        state = net.initial_state(S)
        for n in (3, 1, 2):  # slots at different t: 6 steps for some, fewer for others
            _, state = net.chunk(torch.randn(n, S, *input_shape, device=DEVICE), state)
            rows = torch.tensor([0, 2, 4], device=DEVICE)
            sub = NetState(tuple(NeuronState(ns.window[rows], ns.t[rows]) for ns in state.neurons),
                           state.score_sum[rows], state.t[rows])
            _, sub = net.chunk(torch.randn(1, 3, *input_shape, device=DEVICE), sub)
            for ns, ns2 in zip(state.neurons, sub.neurons, strict=True):
                ns.window[rows], ns.t[rows] = ns2.window, ns2.t
            state.score_sum[rows], state.t[rows] = sub.score_sum, sub.t
        idx = torch.tensor([5, 0, 3, 2], device=DEVICE)
        x = torch.randn(4, *input_shape, device=DEVICE)
        gathered = NetState(tuple(NeuronState(ns.window[idx], ns.t[idx]) for ns in state.neurons),
                            state.score_sum[idx], state.t[idx])
        want, new = net.chunk(x.unsqueeze(0), gathered)
        table = NetState(tuple(NeuronState(ns.window.clone(), ns.t.clone()) for ns in state.neurons),
                         state.score_sum.clone(), state.t.clone())
        got = net.step_slots_(x, table, idx)
    assert torch.equal(got.spikes, want.spikes[0])
    assert 0 < got.spikes.mean() < 1
    torch.testing.assert_close(got.scores, want.scores[0], rtol=1e-5, atol=1e-6)
    rest = torch.tensor([1, 4, 6], device=DEVICE)
    for ns_old, ns_new, ns_want in zip(state.neurons, table.neurons, new.neurons, strict=True):
        torch.testing.assert_close(ns_new.window[idx], ns_want.window, rtol=1e-6, atol=1e-6)
        assert torch.equal(ns_new.t[idx], ns_want.t)
        assert torch.equal(ns_new.window[rest], ns_old.window[rest]) and torch.equal(ns_new.t[rest], ns_old.t[rest])
    torch.testing.assert_close(table.score_sum[idx], new.score_sum, rtol=1e-5, atol=1e-6)
    assert torch.equal(table.t[idx], new.t) and torch.equal(table.t[rest], state.t[rest])
    assert torch.equal(table.score_sum[rest], state.score_sum[rest])
    if DEVICE == "cuda":  # the service's backend takes this path on a GPU
        assert net.steps_slots_fused(x)
