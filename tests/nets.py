"""Small random networks for tests, adjusted so that their neurons really spike."""

from __future__ import annotations

import torch

from model.network import PSNNet


@torch.no_grad()
def make_spiking(net: PSNNet, *, bn_mean: float, bn_affine: bool) -> PSNNet:
    """Give batch norm non-trivial running statistics (mean in ±bn_mean, var in [0.5, 2]; and a random
    affine map if ``bn_affine``), put PSN thresholds at 0 and LIF thresholds at 0.2, so about half the
    neurons spike. Returns ``net`` in eval mode."""
    for layer in net.layers:
        if layer.bn is not None:
            layer.bn.running_mean.uniform_(-bn_mean, bn_mean)
            layer.bn.running_var.uniform_(0.5, 2.0)
            if bn_affine:
                layer.bn.weight.uniform_(0.5, 2.0)
                layer.bn.bias.uniform_(-0.2, 0.2)
        if hasattr(layer.neuron, "v_threshold"):  # LIF: a lower threshold so it spikes often
            layer.neuron.v_threshold = 0.2
        if hasattr(layer.neuron, "bias"):
            layer.neuron.bias.fill_(0.0)  # threshold at 0
    return net.eval()
