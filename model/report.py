"""What a training run leaves beside the weights: reference predictions, a model card, a figure.

- ``reference.json``: a few test inputs with the scores and predictions of the folded network, so
  a loader can check that the folder alone reproduces them;
- ``README.md``: the model card (architecture, data, metrics, comparison table);
- ``training.png``: the training curve and a spike raster of one streamed test sample.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model.data import Dataset, final_scores
from model.evaluate import stream_one
from model.folder import load_model_folder, save_model_folder
from model.kinds import kind
from model.network import PSNNet

REFERENCE_FILE, FIGURE_FILE, CARD_FILE = "reference.json", "training.png", "README.md"
REFERENCE_SAMPLES = 4
# what a --compare folder's metrics.json must hold: its row in the model card's comparison table
COMPARE_KEYS: dict[str, tuple[type, ...]] = {
    "neuron": (str,), "test_acc_parallel": (int, float), "test_acc_streaming": (int, float, type(None)),
    "params": (int,), "train_seconds": (int, float)}
# MNIST-1D test accuracy of the published baselines (Greydanus 2020, "Scaling down deep learning").
MNIST1D_PUBLISHED = [("logistic regression", 0.32), ("MLP", 0.68), ("GRU", 0.91), ("CNN", 0.94)]
# JapaneseVowels test accuracy (270 train / 370 test): the UEA archive paper's 1-NN benchmarks (Bagnall et al.
# 2018, "The UEA multivariate time series classification archive, 2018", arXiv:1811.00075) and the kernel
# methods of Toth, Oberhauser & Szabo 2023 ("Random Fourier Signature Features", arXiv:2311.12214).
PUBLISHED = {
    "mnist1d": [(f"{n} (Greydanus 2020, published)", acc) for n, acc in MNIST1D_PUBLISHED],
    "japanesevowels": [
        ("1-NN DTW, independent (Bagnall et al. 2018, UEA archive)", 0.959),
        ("1-NN DTW, dependent (Bagnall et al. 2018, UEA archive)", 0.949),
        ("1-NN Euclidean (Bagnall et al. 2018, UEA archive)", 0.924),
        ("signature kernel KSig (Toth et al. 2023)", 0.986),
        ("GAK / RBF kernel SVM (Toth et al. 2023)", 0.981),
    ],
}


def reference_indices(y: Tensor, n: int = REFERENCE_SAMPLES, most: int = 10) -> Tensor:
    """Which test samples ``reference.json`` keeps: the first of each class (at most ``most`` classes), so
    the demo page can play every class, topped up with the first other samples to at least ``n``."""
    keep = [int((y == c).nonzero()[0]) for c in range(int(y.max()) + 1) if bool((y == c).any())][:most]
    keep += [i for i in range(y.shape[0]) if i not in keep][:max(0, n - len(keep))]
    return torch.tensor(sorted(keep))


@torch.no_grad()
def reference(fused: PSNNet, data: Dataset, n: int = REFERENCE_SAMPLES) -> dict[str, Any]:
    """Some test samples (raw, time-major; ``reference_indices``) with the folded net's final scores.

    ``test_index`` says which test samples they are. Variable-length data adds ``lengths``: sample i is
    ``x[:lengths[i], i]``, the rest padding, and its scores are those after its own last step.
    """
    idx = reference_indices(data.y_test, n)
    x = data.x_test[idx].transpose(0, 1)  # (T, n, *F)
    lengths = None if data.lengths_test is None else data.lengths_test[idx]
    scores = final_scores(fused(x).scores, lengths)  # (n, C)
    ref = {"test_index": idx.tolist(), "x": x.tolist(), "y": data.y_test[idx].tolist(), "scores": scores.tolist(),
           "predictions": scores.argmax(1).tolist()}
    if lengths is not None:
        ref["lengths"] = lengths.tolist()
    return ref


def check_reference(folder: str | Path, atol: float = 1e-4) -> float:
    """Load ``folder`` and return the largest score difference against its ``reference.json``.

    Raises ``AssertionError`` if a prediction changed or a score moved by more than ``atol``.
    """
    model = load_model_folder(folder)
    ref = json.loads((Path(folder) / REFERENCE_FILE).read_text())
    lengths = torch.tensor(ref["lengths"]) if "lengths" in ref else None
    with torch.no_grad():
        scores = final_scores(model.net(torch.tensor(ref["x"], dtype=torch.float32)).scores, lengths)
    diff = float((scores - torch.tensor(ref["scores"])).abs().max())
    if scores.argmax(1).tolist() != ref["predictions"] or diff > atol:
        raise AssertionError(f"{folder}: reference predictions not reproduced (max score diff {diff:.2e})")
    return diff


def figure_png(metrics: dict[str, Any], fused: PSNNet, data: Dataset) -> bytes:
    """Training curve (loss, train/test accuracy per epoch) and the spike raster of test sample 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = metrics["history"]
    epochs = [r["epoch"] for r in hist]
    fig, (ax_loss, ax_raster) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, [r["loss"] for r in hist], color="tab:red", label="train loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_acc = ax_loss.twinx()
    ax_acc.plot(epochs, [r["train_acc"] for r in hist], color="tab:blue", label="train acc")
    ax_acc.plot(epochs, [r["test_acc"] for r in hist], color="tab:green", label="test acc (parallel)")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(0, 1)
    ax_loss.legend(loc="center left")
    ax_acc.legend(loc="center right")
    label = kind(metrics["neuron"]).label
    ax_loss.set_title(f"{data.name}, {label}: training")
    if fused.cfg.streams:
        n0 = data.T if data.lengths_test is None else int(data.lengths_test[0])
        spikes, scores = stream_one(fused, data.x_test[0, :n0])  # (T, N), (T, C)
        t_idx, n_idx = spikes.nonzero(as_tuple=True)
        ax_raster.scatter(t_idx.numpy(), n_idx.numpy(), s=2, marker="|", color="black")
        pred = int(scores[-1].argmax())
        names = data.class_names
        ax_raster.set_title(f"last layer spikes, test sample 0 streamed (label {names[int(data.y_test[0])]}, "
                            f"predicted {names[pred]})", fontsize=9)
        ax_raster.set_xlim(-0.5, spikes.shape[0] - 0.5)
        ax_raster.set_xlabel("step")
        ax_raster.set_ylabel("neuron")
    else:
        ax_raster.set_axis_off()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def compare_metrics(folder: str | Path) -> dict[str, Any] | None:
    """The metrics.json of a ``--compare`` folder, with what its row in the model card reads; None if there
    is none (the row is left out: a recipe may name a baseline run not kept here); ``ValueError`` naming the
    file if it is unreadable or not a run's metrics (checked before training, so the run is not lost at the end)."""
    f = Path(folder) / "metrics.json"
    if not f.exists():
        return None
    try:
        m = json.loads(f.read_text())
    except OSError as e:
        raise ValueError(f"{f}: cannot read it ({e.strerror or e})") from e
    except ValueError as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from e
    if not isinstance(m, dict):
        raise ValueError(f"{f}: expected a JSON object, got {type(m).__name__}")
    wrong = [k for k, types in COMPARE_KEYS.items() if not isinstance(m.get(k), types) or isinstance(m.get(k), bool)]
    if wrong:
        raise ValueError(f"{f}: not a training run's metrics: {', '.join(wrong)} missing or of the wrong type")
    return m


def comparison_rows(metrics: dict[str, Any], name: str, compare: list[str | Path]) -> list[str]:
    rows = [f"| **{name}** (this model) | {metrics['neuron']} | {_pct(metrics['test_acc_parallel'])} | "
            f"{_pct(metrics['test_acc_streaming'])} | {metrics['params']} | {metrics['train_seconds']:.0f} s |"]
    for folder in compare:
        m = compare_metrics(folder)
        if m is not None:
            rows.append(f"| {Path(folder).name} | {m['neuron']} | {_pct(m['test_acc_parallel'])} | "
                        f"{_pct(m['test_acc_streaming'])} | {m['params']} | {m['train_seconds']:.0f} s |")
    rows += [f"| {n} | - | {_pct(acc)} | - | - | - |" for n, acc in PUBLISHED.get(metrics["dataset"], [])]
    return rows


def _normalisation(cfg) -> str:
    if isinstance(cfg.input_mean, tuple):
        return (f"(x - mean) / std per feature (the training set's {len(cfg.input_mean)} means and stds, "
                "in config.json)")
    return f"(x {'-' if cfg.input_mean >= 0 else '+'} {abs(cfg.input_mean):.4g}) / {cfg.input_std:.4g}"


def model_card(name: str, net: PSNNet, data: Dataset, metrics: dict[str, Any], compare: list[str | Path]) -> str:
    cfg = net.cfg
    layers = " -> ".join(f"{lc.kind} {lc.out}{' + BN' if lc.batch_norm else ''}" for lc in cfg.layers)
    neuron = {"sliding": f"sliding PSN (order k={cfg.k}, {cfg.k} weights shared per layer)",
              "masked": f"masked PSN (order k={cfg.k}, T={cfg.T}; trained with the mask relaxation, served at lam=1)",
              "psn": f"PSN (T={cfg.T}, parallel only)", "lif": f"LIF (tau={cfg.lif_tau}, serial baseline)"}[cfg.neuron]
    per_step = metrics["acc_per_step"]
    marks = sorted({max(1, len(per_step) // 4), max(1, len(per_step) // 2), max(1, 3 * len(per_step) // 4),
                    len(per_step)})
    curve = ", ".join(f"{t} steps: {_pct(per_step[t - 1])}" for t in marks)
    lines = [
        f"# {name}", "",
        f"A {neuron} network trained by this project's own command on {data.name}.", "",
        "## Architecture",
        f"- input: {cfg.input_shape} per step, normalised inside the net as {_normalisation(cfg)} (feed raw data)",
        f"- hidden spiking layers: {layers}, each followed by a {neuron}",
        f"- readout: linear {cfg.num_classes} classes, averaged over the steps seen so far",
        f"- {metrics['params']} parameters", "",
        "## Data", f"{data.description}.", "",
        "## Metrics (measured on the full test set)",
        f"- test accuracy, parallel form: **{_pct(metrics['test_acc_parallel'])}**",
        f"- test accuracy, streamed step by step (`initial_state` + `step`): "
        f"**{_pct(metrics['test_acc_streaming'])}**",
        f"- accuracy after t steps: {curve}",
        f"- training: {metrics['epochs']} epochs, batch {metrics['batch_size']}, {metrics['optimizer']} "
        f"lr {metrics['lr']} with a cosine schedule, seed {metrics['seed']}; "
        f"{metrics['train_seconds']:.0f} s on {metrics['machine']} ({metrics['date']})", "",
        "## Comparison (test accuracy)",
        "| model | neuron | parallel | streamed | params | training time |",
        "| --- | --- | --- | --- | --- | --- |",
        *comparison_rows(metrics, name, compare), "",
        "## Reproduce", f"```\n{metrics['command']}\n```", "",
        f"`{FIGURE_FILE}`: training curve and the spike raster of one streamed test sample. "
        f"`{REFERENCE_FILE}`: inputs and scores that a loaded copy must reproduce.", "",
    ]
    return "\n".join(lines)


def write_folder(out: Path, net: PSNNet, fused: PSNNet, data: Dataset, metrics: dict[str, Any],
                 compare: list[str | Path] | None = None) -> Path:
    """Write the model folder ``out`` atomically (weights, config, metrics, card, figure, reference)."""
    name = out.name
    extra = {
        REFERENCE_FILE: json.dumps(reference(fused, data)) + "\n",
        CARD_FILE: model_card(name, net, data, metrics, list(compare or [])),
        FIGURE_FILE: figure_png(metrics, fused, data),
    }
    return save_model_folder(out, net.cpu(), name=name, dataset=data.name, class_names=data.class_names,
                             metrics=metrics, extra_config={"preset": metrics["preset"], "data": data.source,
                                                           "test_data": metrics.get("test_data"),
                                                           "test_fraction": metrics.get("test_fraction")},
                             extra_files=extra)


__all__ = ["write_folder", "check_reference", "compare_metrics", "model_card", "reference", "REFERENCE_FILE",
           "FIGURE_FILE"]
