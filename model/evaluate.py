"""Measured test accuracy of a trained network: parallel form, step-by-step streaming, per step.

Streaming runs ``net.initial_state`` + ``net.step`` one step at a time over the test set in batches;
its accuracy is measured, never copied from the parallel figure. Variable-length sequences (``lengths``)
are scored after their own last step: padding past it is never part of an answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from model.data import final_scores, time_major
from model.network import PSNNet


@dataclass
class Evaluation:
    acc_parallel: float  # final-step accuracy of the parallel form
    acc_per_step: list[float]  # parallel form: accuracy of the running-mean scores after 1..T steps
    acc_streaming: float | None  # final-step accuracy of step-by-step streaming (None: no step form)
    agreement: float | None  # fraction of test samples where streaming and parallel predict the same class
    max_score_diff: float | None  # largest |streamed - parallel| final score


@torch.no_grad()
def parallel_scores(net: PSNNet, x: Tensor, batch_size: int = 500) -> Tensor:
    """Running-mean scores (T, N, C) of the parallel form for ``x`` (N, T, *F)."""
    dev = net.readout.weight.device
    outs = [net(time_major(x[i:i + batch_size]).to(dev)).scores.cpu() for i in range(0, x.shape[0], batch_size)]
    return torch.cat(outs, dim=1)


@torch.no_grad()
def streamed_scores(net: PSNNet, x: Tensor, batch_size: int = 500, lengths: Tensor | None = None) -> Tensor:
    """Final scores (N, C) for ``x`` (N, T, *F), fed one step at a time through ``net.step``; with
    ``lengths`` (N,) each sequence's scores after its own last step."""
    dev = net.readout.weight.device
    outs = []
    for i in range(0, x.shape[0], batch_size):
        xb = time_major(x[i:i + batch_size]).to(dev)  # (T, B, *F)
        last = (lengths[i:i + batch_size] if lengths is not None else torch.full((xb.shape[1],), xb.shape[0])) - 1
        state = net.initial_state(xb.shape[1])
        final = torch.zeros(xb.shape[1], net.cfg.num_classes)
        for t in range(int(last.max()) + 1):
            out, state = net.step(xb[t], state)
            done = last == t
            final[done] = out.scores.cpu()[done]
        outs.append(final)
    return torch.cat(outs, dim=0)


@torch.no_grad()
def stream_one(net: PSNNet, x: Tensor) -> tuple[Tensor, Tensor]:
    """Stream one sample ``x`` (T, *F): spikes of the last layer (T, N) and scores (T, C) per step."""
    state = net.initial_state(1)
    spikes, scores = [], []
    for t in range(x.shape[0]):
        out, state = net.step(x[t:t + 1].to(net.readout.weight.device), state)
        spikes.append(out.spikes.reshape(-1).cpu())
        scores.append(out.scores[0].cpu())
    return torch.stack(spikes), torch.stack(scores)


def evaluate(net: PSNNet, x: Tensor, y: Tensor, *, batch_size: int = 500, lengths: Tensor | None = None
             ) -> Evaluation:
    """Accuracy of ``net`` (eval mode) on ``x`` (N, T, *F), ``y`` (N,), sequences of ``lengths`` (N,) steps.

    ``acc_per_step[t-1]``: accuracy after t steps (a sequence shorter than t counts with its final answer).
    """
    scores = parallel_scores(net, x, batch_size)  # (T, N, C)
    if lengths is not None:  # past its end a sequence keeps its final answer
        T = scores.shape[0]
        step = torch.minimum(torch.arange(T).unsqueeze(1), lengths.unsqueeze(0) - 1)  # (T, N)
        scores = scores.gather(0, step.unsqueeze(2).expand_as(scores))
    per_step = (scores.argmax(-1) == y.unsqueeze(0)).float().mean(1)  # (T,)
    final = final_scores(scores, lengths)
    acc = float((final.argmax(-1) == y).float().mean())
    if not net.cfg.streams:
        return Evaluation(acc, per_step.tolist(), None, None, None)
    streamed = streamed_scores(net, x, batch_size, lengths)
    return Evaluation(
        acc_parallel=acc,
        acc_per_step=[round(a, 5) for a in per_step.tolist()],
        acc_streaming=float((streamed.argmax(-1) == y).float().mean()),
        agreement=float((streamed.argmax(-1) == final.argmax(-1)).float().mean()),
        max_score_diff=float((streamed - final).abs().max()),
    )


__all__ = ["Evaluation", "evaluate", "parallel_scores", "streamed_scores", "stream_one"]
