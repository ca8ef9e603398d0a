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
from model.data import final_scores
from model.datafile import load_source
from model.evaluate import parallel_scores
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
    # the accuracies are read at each sample's own last step, as training's evaluation reads them
    ds = load_source(model.config)
    x = ds.x_test[:256].reshape(256, ds.x_test.shape[1], *model.cfg.input_shape)
    lengths = None if ds.lengths_test is None else ds.lengths_test[:256]
    final = final_scores(parallel_scores(model.net, x), lengths)
    want = float((final.argmax(-1) == ds.y_test[:256]).float().mean())
    assert real["acc_torch"] == pytest.approx(want, abs=1e-12)
    streams = model.cfg.streams  # then also the step file against the parallel one
    assert len(real["checks"]) == 1 + streams
    for key in ("acc_onnx", "acc_onnx_step")[:1 + streams]:
        assert abs(real[key] - want) <= real["checks"][0]["samples_with_spike_mismatch"] / 256
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


def test_cli_folder_it_cannot_write_and_negative_samples_are_bad_input(tiny, tmp_path, capsys):
    """A folder the files cannot be written into (read-only; here a directory where model.onnx goes, which
    fails for root too) stopped the export with an OSError traceback; --samples -5 was taken as 0."""
    folder = Path(shutil.copytree(tiny["sliding"], tmp_path / "blocked"))
    (folder / PARALLEL_FILE).unlink()
    (folder / PARALLEL_FILE).mkdir()
    (folder / PARALLEL_FILE / "keep").write_text("x")
    assert main([str(folder), "--samples", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(folder) in err and PARALLEL_FILE in err and len(err.splitlines()) == 1
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]  # no temporary file left behind
    assert main([str(tiny["sliding"]), "--samples", "-5"]) == 2
    assert "--samples must be >= 0" in capsys.readouterr().err


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


# ----- edges a mutation sweep of exported/ found untested ------------------------------------------
def _graph_dims(value_info) -> list:
    """An ONNX input's or output's declared shape: symbolic axes as their names, fixed ones as ints."""
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.parametrize("kind", [*KINDS, "sliding-conv"])
def test_metadata_shapes_are_the_graphs_own(tiny, kind):
    """The ``inputs`` / ``outputs`` / ``state`` metadata say what the ONNX graph itself declares (its value
    infos), ``T`` is empty where there is no horizon, and only a masked step file has ``horizon``."""
    model = load_model_folder(tiny[kind])
    for name in (PARALLEL_FILE, STEP_FILE):
        if not (tiny[kind] / name).is_file():
            continue
        proto = onnx.load(str(tiny[kind] / name))
        meta = {p.key: p.value for p in proto.metadata_props}
        declared = {v.name: _graph_dims(v) for v in (*proto.graph.input, *proto.graph.output)}
        for key in ("inputs", "outputs"):
            for tensor, shape in json.loads(meta[key]).items():
                # an axis the exporter left open (the LIF Loop's outputs: "Loopspikes_dim_2") is checked by
                # running the graph below
                graph = [m if isinstance(d, str) and d not in ("T", "batch") else d
                         for d, m in zip(declared[tensor], shape, strict=True)]
                assert graph == shape, (name, tensor)
        if name == STEP_FILE:
            for s in json.loads(meta["state"]):
                assert declared[s["name"]] == declared[s["output"]] == s["shape"], s
        assert meta["input_shape"] == json.dumps(list(model.cfg.input_shape))
        assert meta["T"] == ("8" if kind in ("masked", "psn") else "")
        assert meta["dynamic_T"] == ("true" if kind in ("sliding", "lif", "sliding-conv") else "false")
        assert ("horizon" in meta) == (kind == "masked" and name == STEP_FILE)
    x = random_inputs(model, 8, 3, seed=0)
    spikes, scores = OnnxModel(tiny[kind]).parallel(x)
    assert scores.shape == (8, 3, model.cfg.num_classes) and spikes.shape == (8, 3, *model.net.out_shape)


@pytest.mark.parametrize("opset", [13, 23])
def test_the_lowest_and_highest_opsets_export_and_run(tiny, tmp_path, opset):
    """Both ends of the documented 13..23 range export and run in onnxruntime; 12 and 24 are refused."""
    for kind in ("sliding", "masked"):
        model = load_model_folder(tiny[kind])
        export_model(model, tmp_path / kind, opset=opset)
        onnx_model = OnnxModel(tmp_path / kind)
        assert onnx_model.meta["opset"] == str(opset)
        assert check_parity(model, onnx_model)["passed"]
    for bad in (opset - 1 if opset == 13 else opset + 1,):
        with pytest.raises(ValueError, match=f"opset {bad} is not supported: use one of 13..23"):
            export_model(load_model_folder(tiny["sliding"]), tmp_path / "bad", opset=bad)
    assert not (tmp_path / "bad" / PARALLEL_FILE).exists()


def test_export_is_current_needs_every_file_of_this_export_version(tiny, tmp_path):
    """Not current: the step file of a streaming model missing, or a file of another export version."""
    import shutil

    folder = shutil.copytree(tiny["sliding"], tmp_path / "m")
    assert export_is_current(folder, True)
    (folder / STEP_FILE).unlink()
    assert not export_is_current(folder, True) and export_is_current(folder, False)
    proto = onnx.load(str(tiny["sliding"] / STEP_FILE))
    for p in proto.metadata_props:
        if p.key == "export_version":
            p.value = "0"
    (folder / STEP_FILE).write_bytes(proto.SerializeToString())
    assert not export_is_current(folder, True)
    shutil.copy(tiny["sliding"] / STEP_FILE, folder / STEP_FILE)
    assert export_is_current(folder, True)


def test_an_onnx_file_that_does_not_parse_is_not_current(tiny, tmp_path):
    """A truncated copy or a Git LFS pointer in place of model.onnx: not current (so a server exports the model
    again instead of failing to start)."""
    import shutil

    folder = shutil.copytree(tiny["sliding"], tmp_path / "m")
    data = (folder / PARALLEL_FILE).read_bytes()
    for broken in (data[: len(data) // 2], b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n"):
        (folder / PARALLEL_FILE).write_bytes(broken)
        assert not export_is_current(folder, True)


def test_export_folder_into_another_folder_leaves_the_model_folder_alone(tiny, tmp_path):
    import shutil

    folder = shutil.copytree(tiny["masked"], tmp_path / "m")
    for name in (PARALLEL_FILE, STEP_FILE, PARITY_FILE):
        (folder / name).unlink()
    summary = export_folder(folder, samples=0, out_dir=tmp_path / "out")
    assert summary["passed"] and summary["files"] == [PARALLEL_FILE, STEP_FILE]
    assert {p.name for p in (tmp_path / "out").iterdir()} == {PARALLEL_FILE, STEP_FILE, PARITY_FILE}
    assert not any((folder / name).exists() for name in (PARALLEL_FILE, STEP_FILE, PARITY_FILE))


def test_cli_samples_0_and_no_parity(tiny, tmp_path, capsys):
    """``--samples 0``: parity on random inputs only, the real check recorded as skipped; ``--no-parity``:
    the ONNX files only, no check."""
    import shutil

    folder = shutil.copytree(tiny["sliding"], tmp_path / "m")
    assert main([str(folder), "--samples", "0"]) == 0
    out = capsys.readouterr().out
    assert "real samples: skipped (real samples not requested)" in out and "parity: PASSED" in out
    summary = json.loads((folder / PARITY_FILE).read_text())
    assert summary["passed"] and summary["parity"]["real"] == {"skipped": "real samples not requested"}
    for name in (PARALLEL_FILE, STEP_FILE):
        (folder / name).unlink()
    assert main([str(folder), "--no-parity"]) == 0
    out = capsys.readouterr().out
    assert "wrote model.onnx, model_step.onnx" in out and "parity" not in out
    assert (folder / PARALLEL_FILE).is_file() and (folder / STEP_FILE).is_file()
    assert not (folder / PARITY_FILE).exists()  # the earlier summary checked other files


def test_cli_a_failed_parity_check_exits_1_and_says_fail(tiny, tmp_path, capsys, monkeypatch):
    """A parity failure (here: a score tolerance nothing can meet) writes the files and the summary,
    prints FAIL on the failing rows and exits 1; a bad folder in the same run still makes it 2."""
    import shutil

    from exported import parity

    folder = shutil.copytree(tiny["sliding"], tmp_path / "m")
    monkeypatch.setattr(parity, "SCORE_ATOL", -1.0)
    assert main([str(folder), "--samples", "20"]) == 1
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "spike flips=" in line]  # random, step, 4 x dynamic T, 2 x real
    assert len(rows) == 8 and all(line.endswith("  FAIL") for line in rows) and "parity: FAILED" in out
    assert json.loads((folder / PARITY_FILE).read_text())["passed"] is False
    assert main([str(folder), str(tmp_path / "missing"), "--samples", "0"]) == 2
    assert main([str(tmp_path / "missing"), str(folder), "--samples", "0"]) == 2


def test_compare_rules():
    """``compare``: scores only over samples whose spikes agree; a flip is allowed only in a sample marked
    as a near tie, and only in at most 1% of the samples."""
    from exported.parity import MAX_TIE_FRACTION, SCORE_ATOL, compare

    T, B = 4, 200
    g = np.random.default_rng(0)
    spikes = (g.random((T, B, 5)) < 0.5).astype(np.float32)
    scores = g.standard_normal((T, B, 3)).astype(np.float32)
    no_tie = np.zeros(B, bool)
    assert compare(spikes, scores, spikes, scores + SCORE_ATOL / 2, no_tie)["ok"]
    assert not compare(spikes, scores, spikes, scores + 2 * SCORE_ATOL, no_tie)["ok"]
    flipped, off = spikes.copy(), scores.copy()
    flipped[2, 7, 1] = 1 - flipped[2, 7, 1]
    off[:, 7] += 1.0  # a flipped spike moves that sample's scores: not held against the score tolerance
    tie = no_tie.copy()
    tie[7] = True
    c = compare(spikes, scores, flipped, off, tie)
    assert c["ok"] and c["scores_max_abs_diff"] == 0.0 and c["scores_max_abs_diff_all"] == pytest.approx(1.0)
    assert (c["spike_mismatches"], c["samples_with_spike_mismatch"], c["unexplained_by_ties"]) == (1, 1, 0)
    c = compare(spikes, scores, flipped, off, no_tie)  # the same flip where PyTorch saw no tie
    assert not c["ok"] and c["unexplained_by_ties"] == 1
    many = spikes.copy()
    n = int(MAX_TIE_FRACTION * B) + 1  # explained by ties, but in more than 1% of the samples
    many[0, :n, 0] = 1 - many[0, :n, 0]
    assert not compare(spikes, scores, many, scores, np.ones(B, bool))["ok"]
    many[0, n - 1, 0] = spikes[0, n - 1, 0]
    assert compare(spikes, scores, many, scores, np.ones(B, bool))["ok"]


def test_parity_fails_on_changed_accuracy_that_the_score_rule_let_through(tiny, monkeypatch):
    """The accuracy rule is part of the verdict: with the score tolerance out of the way (patched), a network
    whose readout no longer matches the files (its classes swapped) keeps every spike, so every comparison
    passes, but its real-sample accuracy moves: not passed."""
    from exported import parity

    model = load_model_folder(tiny["sliding"])
    with torch.no_grad():
        model.net.readout.weight.copy_(model.net.readout.weight.roll(1, 0))
        model.net.readout.bias.copy_(model.net.readout.bias.roll(1, 0))
    samples, why = load_test_samples(model, 200)
    assert samples is not None, why
    monkeypatch.setattr(parity, "SCORE_ATOL", float("inf"))
    report = check_parity(model, OnnxModel(tiny["sliding"]), samples)
    real = report["real"]
    assert all(c["ok"] and c["spike_mismatches"] == 0 for c in real["checks"])
    assert real["acc_torch"] != real["acc_onnx"] and not real["accuracy_ok"] and not report["passed"]


def test_min_abs_membrane_against_the_sliding_loop(tiny):
    """The tie detector: per sample, the smallest |H| of any spiking layer, where each layer reads the
    previous layer's spikes, against the paper's sliding PSN loop in float64 (tests/reference.py)."""
    from exported.parity import min_abs_membrane
    from model.config import normalise
    from tests.reference import sliding_loop

    model = load_model_folder(tiny["sliding"])
    ref = load_model_folder(tiny["sliding"], dtype=torch.float64).net
    T, B = 12, 5
    x = random_inputs(model, T, B, seed=11)
    h = normalise(ref.cfg, torch.from_numpy(x).double())
    want = np.full(B, np.inf)
    for layer in ref.layers:
        with torch.no_grad():
            cur = layer.current(h.reshape(T * B, *h.shape[2:])).reshape(T, B, -1).numpy()
        w, b = layer.neuron.weight.detach().numpy(), float(layer.neuron.bias.detach())
        s, mem = sliding_loop(cur.reshape(T, -1), w, b)
        want = np.minimum(want, np.abs(mem).reshape(T, B, -1).min(axis=(0, 2)))
        h = torch.from_numpy(s.reshape(T, B, -1))
    got = min_abs_membrane(model.net, torch.from_numpy(x))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert want.max() > 1e-3  # not all trivially zero


def test_parity_report_runs_the_documented_checks(tiny):
    """Random inputs at the data's T, the step file against the parallel one, and for a dynamic-T model
    T = 1, 3, T + 5 and 2T + 1 (docs/onnx.md), each on the training scale of the inputs."""
    model = load_model_folder(tiny["sliding"])
    report = check_parity(model, OnnxModel(tiny["sliding"]))
    T0 = 8  # no horizon, no metrics.json: the export's example T
    assert report["passed"] and (report["random"]["T"], report["random"]["batch"]) == (T0, 16)
    assert report["step_vs_parallel"]["ok"] and report["step_vs_parallel"]["T"] == T0
    assert [c["T"] for c in report["dynamic_T"]] == [1, 3, T0 + 5, 2 * T0 + 1]
    x = random_inputs(model, 50, 100, seed=0)  # N(input_mean, input_std): 5 and 6 for the tiny nets
    assert abs(x.mean() - 5.0) < 0.1 and abs(x.std() - 6.0) < 0.1
    masked = check_parity(load_model_folder(tiny["masked"]), OnnxModel(tiny["masked"]))
    assert masked["passed"] and "dynamic_T" not in masked and masked["random"]["T"] == 8
    # without real samples a sliding model is checked at the length it was trained on (metrics.json)
    shipped = REPO / "exported" / "mnist1d-sliding"
    model = load_model_folder(shipped)
    report = check_parity(model, OnnxModel(shipped), batch=4)
    assert report["passed"] and report["random"]["T"] == model.metrics["T"] == 40


def test_step_on_a_model_without_a_step_file_is_a_clear_error(tiny):
    onnx_model = OnnxModel(tiny["psn"])
    assert not onnx_model.streams and onnx_model.initial_state(2) == []
    with pytest.raises(ValueError, match="model 'tiny-psn' has no step form"):
        onnx_model.step(np.zeros((1, 8), np.float32), [])
