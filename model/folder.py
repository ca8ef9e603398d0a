"""Model folders (``exported/<name>/``): a self-describing trained model the service can load.

A folder holds:
- ``config.json``: ``format_version``, ``name``, ``net`` (a ``NetConfig`` as a dict: architecture,
  neuron, k, T, input shape, normalisation), ``dataset``, ``class_names``, ``created``;
- ``weights.safetensors``: the trained state dict (batch norm still separate);
- ``metrics.json``: test accuracy of the parallel form and of streaming, training time, ...;
- anything else a writer adds (model card ``README.md``, plots, ONNX files).

``load_model_folder`` rebuilds the network from the folder alone (no pickle anywhere).
Writes are atomic: the folder is built beside its target and renamed into place.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import errno
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.network import NetConfig, PSNNet

FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE, METRICS_FILE = "config.json", "weights.safetensors", "metrics.json"


class ModelFolderError(ValueError):
    """A model folder is missing, incomplete or inconsistent."""


@dataclass
class LoadedModel:
    name: str
    path: Path
    net: PSNNet  # eval mode, batch norm folded (``PSNNet.fused``)
    config: dict[str, Any]  # config.json as stored
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def cfg(self) -> NetConfig:
        return self.net.cfg

    @property
    def class_names(self) -> list[str]:
        return list(self.config.get("class_names") or [str(i) for i in range(self.cfg.num_classes)])


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or the file system cannot, and nothing was changed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without it (glibc < 2.28)
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM):  # not supported here
        return False
    raise OSError(err, os.strerror(err), str(b))


def save_model_folder(path: str | os.PathLike, net: PSNNet, *, name: str | None = None, dataset: str = "",
                      class_names: list[str] | None = None, metrics: dict[str, Any] | None = None,
                      extra_config: dict[str, Any] | None = None,
                      extra_files: dict[str, bytes | str] | None = None) -> Path:
    """Write ``net`` (any mode; saved as-is) to ``path`` atomically and return the path."""
    path = Path(path)
    name = name or path.name
    if class_names is not None and len(class_names) != net.cfg.num_classes:
        raise ModelFolderError(f"class_names: {len(class_names)} names for {net.cfg.num_classes} classes")
    config = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "net": net.cfg.to_dict(),
        "dataset": dataset,
        "class_names": class_names or [str(i) for i in range(net.cfg.num_classes)],
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        **(extra_config or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a served model folder must be readable (e.g. by a container user)
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / METRICS_FILE).write_text(json.dumps(metrics or {}, indent=2) + "\n")
        for fname, content in (extra_files or {}).items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(tmp / fname, mode) as f:
                f.write(content)
        for f in tmp.iterdir():  # safetensors writes its file 0600; a served folder must be readable by all
            f.chmod(0o644)
        if path.exists() and _exchange(tmp, path):  # one atomic step: never a moment without the folder
            shutil.rmtree(tmp, ignore_errors=True)  # the old folder, now
        elif path.exists():  # two renames: a kill between them leaves the old folder as .NAME.old
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise ModelFolderError(f"{path}: no such model folder")
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise ModelFolderError(f"{path}: missing {CONFIG_FILE}")
    try:
        config = json.loads(cfg_file.read_text())
    except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError: not UTF-8
        raise ModelFolderError(f"{cfg_file}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise ModelFolderError(f"{cfg_file}: expected a JSON object, got {type(config).__name__}")
    if config.get("format_version") != FORMAT_VERSION:
        raise ModelFolderError(f"{cfg_file}: format_version {config.get('format_version')!r}, "
                               f"this code reads {FORMAT_VERSION}")
    return config


def load_model_folder(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32, fuse: bool = True) -> LoadedModel:
    """Rebuild the network from ``path`` alone; eval mode, batch norm folded unless ``fuse=False``."""
    path = Path(path)
    config = read_config(path)
    try:
        net = PSNNet(NetConfig.from_dict(config["net"]))  # PSNNet: layer shapes (a conv needs (channels, length))
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFolderError(f"{path / CONFIG_FILE}: bad 'net' config ({e})") from e
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelFolderError(f"{path}: missing {WEIGHTS_FILE}")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise ModelFolderError(f"{weights}: not a readable safetensors file ({e})") from e
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise ModelFolderError(f"{weights}: does not match the config ({e})") from e
    net.eval()
    if fuse:
        net = net.fused()
    net = net.to(device=device, dtype=dtype)
    metrics_file = path / METRICS_FILE
    try:
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    except ValueError as e:
        raise ModelFolderError(f"{metrics_file}: not valid JSON ({e})") from e
    return LoadedModel(name=config.get("name", path.name), path=path, net=net, config=config, metrics=metrics)


def find_model_folders(root: str | os.PathLike) -> list[Path]:
    """Every folder directly under ``root`` that holds a config.json, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and (p / CONFIG_FILE).is_file())
