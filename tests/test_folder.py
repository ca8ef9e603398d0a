"""Model folders: atomic writes and overwrites, what ``find_model_folders`` lists, and a clear
``ModelFolderError`` naming the file for every way a folder can be broken (the export CLI reports those
and goes on with the other folders; anything else was a traceback)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from model.folder import ModelFolderError, find_model_folders, load_model_folder, save_model_folder
from model.network import LayerConfig, NetConfig, PSNNet


def _net(out: int = 6, seed: int = 0) -> PSNNet:
    torch.manual_seed(seed)
    return PSNNet(NetConfig(input_shape=(3,), num_classes=2, layers=(LayerConfig("linear", out),))).eval()


def _edit_config(folder: Path, edit: Callable[[dict], None]) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def _weights_of(folder: Path, net: PSNNet) -> None:
    other = save_model_folder(folder.parent / "other", net)
    shutil.copy(other / "weights.safetensors", folder / "weights.safetensors")


BROKEN: dict[str, tuple[Callable[[Path], object], str]] = {
    "no config.json": (lambda f: (f / "config.json").unlink(), "missing config.json"),
    "config.json not JSON": (lambda f: (f / "config.json").write_text("{"), "config.json: not valid JSON"),
    "config.json not UTF-8": (lambda f: (f / "config.json").write_bytes(b"\xff\xfe{"), "config.json: not valid JSON"),
    "config.json a list": (lambda f: (f / "config.json").write_text("[1]"), "config.json: expected a JSON object"),
    "another format version": (lambda f: _edit_config(f, lambda c: c.update(format_version=2)),
                               "format_version 2, this code reads 1"),
    "no net": (lambda f: _edit_config(f, lambda c: c.pop("net")), "bad 'net' config"),
    "a bad net value": (lambda f: _edit_config(f, lambda c: c["net"].update(k=0)), "bad 'net' config (k must be"),
    "a conv layer on one feature axis": (lambda f: _edit_config(f, lambda c: c["net"]["layers"][0].update(kind="conv")),
                                         "bad 'net' config (conv layer needs (channels, length) input"),
    "no weights": (lambda f: (f / "weights.safetensors").unlink(), "missing weights.safetensors"),
    "weights not safetensors": (lambda f: (f / "weights.safetensors").write_bytes(b"garbage"),
                                "weights.safetensors: not a readable safetensors file"),
    "weights of another net": (lambda f: _weights_of(f, _net(out=7)), "does not match the config"),
    "metrics.json not JSON": (lambda f: (f / "metrics.json").write_text("{"), "metrics.json: not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_folder_is_a_model_folder_error_naming_the_file(case: str, tmp_path: Path) -> None:
    folder = save_model_folder(tmp_path / "m", _net())
    load_model_folder(folder)  # whole, it loads
    breaks, message = BROKEN[case]
    breaks(folder)
    with pytest.raises(ModelFolderError) as e:
        load_model_folder(folder)
    assert message in str(e.value)


def test_a_missing_folder_is_a_model_folder_error(tmp_path: Path) -> None:
    with pytest.raises(ModelFolderError, match="no such model folder"):
        load_model_folder(tmp_path / "nowhere")


def test_class_names_must_name_every_class(tmp_path: Path) -> None:
    with pytest.raises(ModelFolderError, match="class_names: 3 names for 2 classes"):
        save_model_folder(tmp_path / "m", _net(), class_names=["a", "b", "c"])
    assert not list(tmp_path.iterdir())
    m = load_model_folder(save_model_folder(tmp_path / "m", _net(), class_names=["no", "yes"]))
    assert m.class_names == ["no", "yes"] and m.name == "m"


def test_a_write_over_a_folder_replaces_it_and_leaves_nothing_beside(tmp_path: Path) -> None:
    path = save_model_folder(tmp_path / "m", _net(seed=0), extra_files={"notes.txt": "old"})
    new = _net(seed=1)
    save_model_folder(path, new, metrics={"acc": 0.5})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no .m.old, no temporary folder
    assert not (path / "notes.txt").exists()  # the old folder's files went with it
    loaded = load_model_folder(path, fuse=False)
    assert loaded.metrics == {"acc": 0.5}
    assert all(torch.equal(a, b) for a, b in zip(loaded.net.state_dict().values(), new.state_dict().values(),
                                                 strict=True))


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_a_write_over_a_folder_never_leaves_the_name_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           exchange: bool) -> None:
    """The old folder is swapped for the new one in one step where the system can (renameat2
    RENAME_EXCHANGE): a training run killed mid-swap must not leave the model without a folder. Each
    rename is watched: with the exchange the name is never missing; without it (another file system),
    the two renames still end with the new folder."""
    import model.folder as folder

    path = save_model_folder(tmp_path / "m", _net(seed=0))
    if exchange and not folder._exchange(tmp_path / "m", tmp_path / "m"):
        pytest.skip("no renameat2(RENAME_EXCHANGE) here")
    if not exchange:
        monkeypatch.setattr(folder, "_exchange", lambda a, b: False)
    gaps = []
    real_rename = Path.rename

    def watched(self: Path, target: str | Path) -> Path:
        out = real_rename(self, target)
        gaps.append(not path.exists())
        return out

    monkeypatch.setattr(Path, "rename", watched)
    new = _net(seed=1)
    save_model_folder(path, new)
    assert gaps == ([] if exchange else [True, False])  # the exchange renames nothing the plain way
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    loaded = load_model_folder(path, fuse=False)
    assert all(torch.equal(a, b) for a, b in zip(loaded.net.state_dict().values(), new.state_dict().values(),
                                                 strict=True))


def test_exchange_swaps_two_folders(tmp_path: Path) -> None:
    from model.folder import _exchange

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("b")
    if not _exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("no renameat2(RENAME_EXCHANGE) here")
    assert (tmp_path / "a" / "x").read_text() == "b" and (tmp_path / "b" / "x").read_text() == "a"
    with pytest.raises(FileNotFoundError):
        _exchange(tmp_path / "a", tmp_path / "missing")


def test_a_failed_write_keeps_the_old_folder_and_leaves_nothing_beside(tmp_path: Path) -> None:
    path = save_model_folder(tmp_path / "m", _net(seed=0))
    before = (path / "weights.safetensors").read_bytes()
    with pytest.raises(FileNotFoundError):  # a file in a folder the writer does not make
        save_model_folder(path, _net(seed=1), extra_files={"sub/card.md": "x"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert (path / "weights.safetensors").read_bytes() == before


def test_find_model_folders_lists_named_folders_with_a_config(tmp_path: Path) -> None:
    assert find_model_folders(tmp_path / "nowhere") == []
    for name in ("b", "a"):
        save_model_folder(tmp_path / name, _net())
    shutil.copytree(tmp_path / "a", tmp_path / ".a.tmp123")  # a write under way (or left by a crash)
    (tmp_path / "c").mkdir()  # no config.json
    (tmp_path / "d.json").write_text("{}")
    assert [p.name for p in find_model_folders(tmp_path)] == ["a", "b"]
