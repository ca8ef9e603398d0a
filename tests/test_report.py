"""What a training run writes beside the weights (model/report.py): which test samples reference.json keeps,
check_reference's verdict, the --compare rows and the model card's normalisation line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.cli import main as psn_main
from model.data import Dataset
from model.network import LayerConfig, NetConfig, PSNNet
from model.report import check_reference, compare_metrics, comparison_rows, model_card, reference_indices

TINY = ["--dataset", "digits", "--preset", "tiny", "--epochs", "1", "--train-limit", "200", "--test-limit", "60",
        "--batch-size", "32", "--quiet"]


def test_reference_keeps_the_first_sample_of_each_class_topped_up_to_four():
    y = torch.tensor([1, 1, 0, 1, 0, 1])
    assert reference_indices(y).tolist() == [0, 1, 2, 3]  # classes 1 and 0 first seen at 0 and 2, then 1 and 3
    assert reference_indices(torch.tensor([2, 2, 0, 1, 1])).tolist() == [0, 1, 2, 3]
    assert reference_indices(torch.tensor([3, 3, 3, 3, 3, 2])).tolist() == [0, 1, 2, 5]  # the last class too
    # more classes than four: one each, no more; at most ten classes
    y = torch.tensor([5, 4, 4, 3, 2, 1, 0, 0])
    assert reference_indices(y).tolist() == [0, 1, 3, 4, 5, 6]
    y = torch.arange(11).flip(0).repeat(2)  # 10, 9, ..., 0, 10, ...: class c first at 10 - c
    assert reference_indices(y).tolist() == list(range(1, 11))  # classes 0..9; 10 left out


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "digits-tiny"
    assert psn_main(["train", *TINY, "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("change", ["score up", "score down", "prediction"])
def test_check_reference_refuses_a_score_or_prediction_not_reproduced(folder, tmp_path, change):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    assert check_reference(copy) < 1e-4
    ref = json.loads((copy / "reference.json").read_text())
    if change == "prediction":  # a stored answer that the scores do not give
        ref["predictions"][0] = (ref["predictions"][0] + 1) % len(ref["scores"][0])
    else:  # a score moved by 1e-3, too little to change which class wins
        ref["scores"][0] = [s + (1e-3 if change == "score up" else -1e-3) for s in ref["scores"][0]]
    (copy / "reference.json").write_text(json.dumps(ref))
    with pytest.raises(AssertionError, match="reference predictions not reproduced"):
        check_reference(copy)


def test_compare_metrics_refuses_a_folder_it_cannot_read_and_a_bool_as_a_number(tmp_path):
    run = {"neuron": "sliding", "test_acc_parallel": 0.9, "test_acc_streaming": 0.9, "params": 100,
           "train_seconds": 3.0}
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "metrics.json").write_text(json.dumps(run))
    assert compare_metrics(tmp_path / "ok") == run
    (tmp_path / "flag").mkdir()
    (tmp_path / "flag" / "metrics.json").write_text(json.dumps({**run, "params": True}))
    with pytest.raises(ValueError, match="params missing or of the wrong type"):
        compare_metrics(tmp_path / "flag")
    (tmp_path / "dir" / "metrics.json").mkdir(parents=True)  # there, but not a file
    with pytest.raises(ValueError, match="metrics.json: cannot read it"):
        compare_metrics(tmp_path / "dir")


def test_comparison_rows_put_each_accuracy_in_its_column(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "metrics.json").write_text(json.dumps(
        {"neuron": "lif", "test_acc_parallel": 0.5, "test_acc_streaming": 0.25, "params": 7, "train_seconds": 9.4}))
    this = {"neuron": "sliding", "test_acc_parallel": 0.75, "test_acc_streaming": None, "params": 12,
            "train_seconds": 2.6, "dataset": "mnist1d"}
    rows = comparison_rows(this, "mine", [tmp_path / "base", tmp_path / "absent"])
    assert rows[:2] == ["| **mine** (this model) | sliding | 75.0% | n/a | 12 | 3 s |",
                        "| base | lif | 50.0% | 25.0% | 7 | 9 s |"]
    # then the published MNIST-1D baselines (Greydanus 2020), accuracy in the parallel column
    assert rows[2:] == [f"| {name} (Greydanus 2020, published) | - | {acc} | - | - | - |"
                        for name, acc in [("logistic regression", "32.0%"), ("MLP", "68.0%"), ("GRU", "91.0%"),
                                          ("CNN", "94.0%")]]


@pytest.mark.parametrize("mean,std,text", [
    (-2.5, 4.0, "(x + 2.5) / 4"),
    (0.125, 0.5, "(x - 0.125) / 0.5"),
    ((1.0, -1.0, 3.0), (1.0, 2.0, 3.0), "(x - mean) / std per feature (the training set's 3 means and stds"),
])
def test_model_card_states_the_normalisation_in_the_net_and_each_accuracy(mean, std, text):
    net = PSNNet(NetConfig(input_shape=(3,), num_classes=2, layers=(LayerConfig("linear", 4),), k=2,
                           input_mean=mean, input_std=std))
    x = torch.zeros(4, 5, 3)
    data = Dataset("toy", x, torch.tensor([0, 1, 0, 1]), x, torch.tensor([0, 1, 0, 1]), ["a", "b"], "toy data")
    metrics = {"neuron": "sliding", "dataset": "toy", "test_acc_parallel": 0.5, "test_acc_streaming": 0.25,
               "acc_per_step": [0.5] * 5, "params": net.num_parameters(), "epochs": 1, "batch_size": 2,
               "optimizer": "adam", "lr": 0.01, "seed": 0, "train_seconds": 1.0, "machine": "here",
               "date": "2026-01-01", "command": "psn train"}
    card = model_card("toy", net, data, metrics, [])
    assert f"normalised inside the net as {text}" in card
    assert "parallel form: **50.0%**" in card and "(`initial_state` + `step`): **25.0%**" in card
