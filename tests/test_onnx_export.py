"""ONNX export (issue 5): files, checker, metadata, parity with PyTorch in onnxruntime, the CLI.

Tiny models of every neuron kind are built and exported here; every shipped model under exported/
is checked from its committed ONNX files, on random inputs and on real test samples.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from exported.export import PARITY_FILE, export_folder, load_test_samples, main
from exported.onnx_export import PARALLEL_FILE, STEP_FILE, export_is_current, export_model
from exported.parity import check_parity, random_inputs
from exported.runtime import OnnxModel
from model.folder import find_model_folders, load_model_folder, save_model_folder
from model.network import LayerConfig, NetConfig, PSNNet

REPO = Path(__file__).resolve().parents[1]
SHIPPED = find_model_folders(REPO / "exported")
KINDS = ("sliding", "masked", "psn", "lif")


def _tiny(kind: str, root: Path, *, conv: bool = False, seed: int = 0) -> Path:
    """A small trained-looking net (batch norm statistics set by a train-mode pass) on digits' shape."""
    torch.manual_seed(seed)
    if conv:
        shape, layers = (2, 4), (LayerConfig(kind="conv", out=3), LayerConfig(out=12))
    else:
        shape, layers = (8,), (LayerConfig(out=16), LayerConfig(out=12))
    cfg = NetConfig(input_shape=shape, num_classes=10, layers=layers, neuron=kind, k=3,
                    T=8 if kind in ("masked", "psn") else None, input_mean=5.0, input_std=6.0)
    net = PSNNet(cfg).train()
    with torch.no_grad():
        net(torch.randn(8, 64, *shape) * 6 + 5)
    return save_model_folder(root / f"tiny-{kind}{'-conv' if conv else ''}", net.eval(), dataset="digits",
                             class_names=[f"c{i}" for i in range(10)])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    folders = {kind: _tiny(kind, root) for kind in KINDS}
    folders["sliding-conv"] = _tiny("sliding", root, conv=True, seed=1)
    for folder in folders.values():
        export_folder(folder, samples=200)
    return folders


# ----- files, checker, metadata --------------------------------------------------------------------
@pytest.mark.parametrize("kind", [*KINDS, "sliding-conv"])
def test_tiny_export_writes_checked_files_and_passes_parity(tiny, kind):
    folder = tiny[kind]
    assert (folder / PARALLEL_FILE).is_file()
    assert (folder / STEP_FILE).is_file() == (kind != "psn")
    for name in (PARALLEL_FILE, STEP_FILE):
        if (folder / name).is_file():
            onnx.checker.check_model(onnx.load(str(folder / name)), full_check=True)
    summary = json.loads((folder / PARITY_FILE).read_text())
    assert summary["passed"], summary
    real = summary["parity"]["real"]  # digits rows (8,); the conv net takes them reshaped to (2, 4)
    assert real["samples"] == 200 and real["acc_onnx"] == real["acc_torch"]


def test_metadata_describes_the_model_and_its_state(tiny):
    model = load_model_folder(tiny["masked"])
    onnx_model = OnnxModel(tiny["masked"])
    meta = onnx_model.meta
    assert meta["model_name"] == "tiny-masked" and meta["neuron"] == "masked" and meta["form"] == "parallel"
    assert (meta["k"], meta["T"], meta["dynamic_T"]) == ("3", "8", "false")
    assert json.loads(meta["input_shape"]) == [8]
    assert json.loads(meta["class_names"]) == [f"c{i}" for i in range(10)]
    assert float(meta["input_mean"]) == 5.0 and float(meta["input_std"]) == 6.0
    assert meta["opset"] == "18" and meta["export_version"] == "1"
    assert export_is_current(tiny["masked"], True)
    step = onnx.load(str(tiny["masked"] / STEP_FILE))
    state = json.loads({p.key: p.value for p in step.metadata_props}["state"])
    names = [s["name"] for s in state]
    assert names == ["state_0_window", "state_0_t", "state_1_window", "state_1_t", "state_score_sum", "state_t"]
    assert [i.name for i in step.graph.input] == ["x", *names]
    assert [o.name for o in step.graph.output] == ["spikes", "scores", *(f"new_{n}" for n in names)]
    assert state[0]["shape"] == ["batch", 3, 16] and state[1]["dtype"] == "int64"
    assert state[4]["shape"] == ["batch", model.cfg.num_classes]
    # the ONNX input shapes agree with the metadata, batch symbolic
    dims = [d.dim_param or d.dim_value for d in step.graph.input[1].type.tensor_type.shape.dim]
    assert dims[1:] == [3, 16] and isinstance(dims[0], str)


# ----- parity ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sliding", "lif", "sliding-conv"])
def test_dynamic_T_matches_torch_at_several_lengths(tiny, kind):
    model = load_model_folder(tiny[kind])
    onnx_model = OnnxModel(tiny[kind])
    for T, B in ((1, 1), (2, 5), (17, 3), (64, 2)):
        x = random_inputs(model, T, B, seed=T)
        with torch.no_grad():
            ref = model.net(torch.from_numpy(x))
        spikes, scores = onnx_model.parallel(x)
        assert scores.shape == (T, B, 10)
        np.testing.assert_allclose(scores, ref.scores.numpy(), atol=1e-4, rtol=0)
        assert (spikes == ref.spikes.numpy()).mean() > 0.999


@pytest.mark.parametrize("kind", ["sliding", "masked", "lif"])
def test_step_onnx_equals_parallel_onnx_and_torch_step(tiny, kind):
    model = load_model_folder(tiny[kind])
    onnx_model = OnnxModel(tiny[kind])
    x = random_inputs(model, 8, 6, seed=3)
    par_spikes, par_scores = onnx_model.parallel(x)
    st_spikes, st_scores, state = onnx_model.run_steps(x)
    np.testing.assert_allclose(st_scores, par_scores, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(st_spikes, par_spikes)
    # the final ONNX state is PyTorch's NetState after the same steps
    with torch.no_grad():
        ref = model.net.initial_state(6)
        for x_t in torch.from_numpy(x):
            _, ref = model.net.step(x_t, ref)
    np.testing.assert_allclose(state[-2], ref.score_sum.numpy(), atol=1e-4)
    np.testing.assert_array_equal(state[-1], ref.t.numpy())
    np.testing.assert_allclose(state[0], ref.neurons[0].window.numpy(), atol=1e-4)


def test_masked_step_past_its_horizon_is_refused(tiny):
    onnx_model = OnnxModel(tiny["masked"])
    state = [s + 8 if s.dtype == np.int64 else s for s in onnx_model.initial_state(1)]  # t = T
    with pytest.raises(Exception, match="out of"):
        onnx_model.step(np.zeros((1, 8), np.float32), state)


def test_parity_check_catches_a_model_that_does_not_match(tiny, tmp_path):
    other = load_model_folder(_tiny("sliding", tmp_path, seed=7))
    export_model(other, tmp_path / "onnx")
    wrong = load_model_folder(tiny["sliding"])  # different weights than the exported files
    assert not export_is_current(tmp_path / "onnx", True)  # no weights file there: not current
    report = check_parity(wrong, OnnxModel(tmp_path / "onnx"))
    assert not report["passed"]
    assert not report["random"]["ok"] and report["random"]["unexplained_by_ties"] > 0


# ----- shipped models -------------------------------------------------------------------------------
@pytest.mark.parametrize("folder", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_model_files_exist_pass_checker_and_match_torch(folder):
    model = load_model_folder(folder)
    names = [PARALLEL_FILE] + ([STEP_FILE] if model.cfg.streams else [])
    for name in names:
        assert (folder / name).is_file(), f"{folder / name} missing: run python -m exported.export --all"
        onnx.checker.check_model(onnx.load(str(folder / name)), full_check=True)
    assert export_is_current(folder, model.cfg.streams), "ONNX files older than the weights: re-export"
    samples, why = load_test_samples(model, 256)
    assert samples is not None, why
    report = check_parity(model, OnnxModel(folder), samples, batch=8)
    assert report["passed"], json.dumps(report, indent=1)
    real = report["real"]
    assert real["samples"] == 256
    print(f"{model.name}: acc torch {real['acc_torch']:.4f} onnx {real['acc_onnx']:.4f} "
          f"step {real.get('acc_onnx_step')}")


# ----- the command line -----------------------------------------------------------------------------
def test_cli_refuses_bad_input_with_a_clear_message(tiny, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    broken = Path(shutil.copytree(tiny["sliding"], tmp_path / "broken"))
    (broken / "weights.safetensors").write_bytes(b"garbage")
    cases = [
        ([str(tmp_path / "missing")], "no such model folder"),
        ([str(tmp_path / "empty")], "missing config.json"),
        ([str(broken)], "weights.safetensors: not a readable safetensors file"),
        (["--opset", "7", str(tiny["sliding"])], "opset 7 is not supported"),
        ([], "name model folders or pass --all"),
        (["--all", "--root", str(tmp_path / "empty")], "no model folders"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err
    assert not (tmp_path / "empty" / PARALLEL_FILE).exists()


def test_cli_psn_model_gets_the_parallel_file_only_and_says_so(tmp_path, capsys):
    folder = _tiny("psn", tmp_path)
    (folder / STEP_FILE).write_bytes(b"stale")  # an old step file must not survive
    assert main([str(folder), "--samples", "50"]) == 0
    out = capsys.readouterr().out
    assert "cannot stream" in out and "PASSED" in out
    assert (folder / PARALLEL_FILE).is_file() and not (folder / STEP_FILE).exists()


def test_cli_module_entry_point_exports_all(tmp_path):
    for kind in ("sliding", "masked"):
        _tiny(kind, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "exported.export", "--all", "--root", str(tmp_path),
                           "--opset", "17", "--samples", "64"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("parity: PASSED") == 2
    meta = OnnxModel(tmp_path / "tiny-sliding").meta
    assert meta["opset"] == "17" and meta["dynamic_T"] == "true"


@pytest.mark.parametrize("folder", SHIPPED, ids=[p.name for p in SHIPPED])
def test_export_defaults_reproduce_the_shipped_parity_files(folder):
    """`python -m exported.export --all` with its defaults checks as many real samples as the shipped
    onnx_parity.json records (so rerunning it leaves the tracked files as they are)."""
    from exported.export import DEFAULT_SAMPLES, build_parser

    shipped = json.loads((folder / PARITY_FILE).read_text())
    test_samples = load_model_folder(folder).metrics["test_samples"]
    assert shipped["parity"]["real"]["samples"] == min(DEFAULT_SAMPLES, test_samples)
    assert build_parser().parse_args(["--all"]).samples == DEFAULT_SAMPLES
    assert shipped["opset"] == build_parser().parse_args(["--all"]).opset
