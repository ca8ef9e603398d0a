"""The capability table of model.kinds says what each neuron kind's network really does."""

from __future__ import annotations

import pytest
import torch

from model.checks import InputError
from model.kinds import KINDS
from model.network import LayerConfig, NetConfig, PSNNet

T = 6


def _net(name: str, k: int = 3) -> PSNNet:
    torch.manual_seed(0)
    cfg = NetConfig(input_shape=(4,), num_classes=3, layers=(LayerConfig("linear", 8),), neuron=name, k=k,
                    T=T if KINDS[name].horizon else None)
    return PSNNet(cfg).eval()


def _accepts(net: PSNNet, steps: int) -> bool:
    try:
        net(torch.randn(steps, 2, 4))
    except InputError:
        return False
    return True


@pytest.mark.parametrize("name", sorted(KINDS))
def test_capabilities_match_behaviour(name):
    kd, net = KINDS[name], _net(name)
    assert net.cfg.kind is kd and net.cfg.streams == kd.streams
    assert net.cfg.horizon == (T if kd.horizon else None)
    # streams: a step form exists
    try:
        net.initial_state(2)
        streams = True
    except InputError:
        streams = False
    assert streams == kd.streams
    # dynamic T: a longer sequence than T is taken; exact T: a shorter one is refused
    assert _accepts(net, T + 3) == kd.dynamic_T
    assert _accepts(net, T - 2) == (not kd.exact_T)
    # causal: outputs up to step t are the same whatever follows
    x = torch.randn(T, 2, 4) * 2
    y = x.clone()
    y[3:] = torch.randn(T - 3, 2, 4) * 2
    with torch.no_grad():
        same = torch.equal(net(x).scores[:3], net(y).scores[:3])
    assert same == kd.causal
    # has_k: the order changes what the network computes
    with torch.no_grad():
        outs = [_net(name, k)(x).scores for k in (2, 3)]
    assert (not torch.equal(outs[0], outs[1])) == kd.has_k


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="neuron: expected one of"):
        NetConfig(input_shape=(4,), num_classes=3, neuron="izhikevich")
