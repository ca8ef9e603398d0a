"""The README's and docs' examples run, so they cannot rot.

- every fenced ``python`` block that needs no running server runs as a script from the repository root
  (the ones that talk to a server run in tests/service/test_docs_server.py);
- every ``psn train`` / ``python -m model.train`` command in a ``bash`` block passes the training
  command's own option checks (data available, options valid), without training;
- every ``python -m exported.export`` command names folders that exist and options the exporter takes.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SERVER = re.compile(r"localhost:8000|127\.0\.0\.1:8000|ws://")


def fenced(lang: str) -> list[tuple[str, str]]:
    """(id "file:line", code) of every ```lang block in the docs (``""``: the blocks that name no language);
    fences are read in order, each opening one closed by the next bare one."""
    out = []
    for path in DOCS:
        opened: tuple[str, int, str, list[str]] | None = None  # language, line, indent and code of the open block
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            fence = line.strip()
            if opened is None and fence.startswith("```"):
                opened = (fence[3:].strip(), n, line[:len(line) - len(line.lstrip())], [])
            elif opened is not None and fence == "```":
                if opened[0] == lang:
                    out.append((f"{path.relative_to(REPO)}:{opened[1]}", "".join(opened[3])))
                opened = None
            elif opened is not None:  # a fence indented in a list item: its code is indented as much
                opened[3].append(line.removeprefix(opened[2]) + "\n")
    return out


def commands(prefixes: tuple[str, ...]) -> list[tuple[str, list[str]]]:
    """Shell commands (continuation lines joined, comments dropped) starting with one of ``prefixes``."""
    found = []
    for where, code in fenced("bash") + fenced(""):
        for cmd in code.replace("\\\n", " ").splitlines():
            for prefix in prefixes:
                if cmd.strip().startswith(prefix + " "):
                    found.append((where, shlex.split(cmd, comments=True)[len(prefix.split()):]))
    return found


LOCAL_PYTHON = [(w, c) for w, c in fenced("python") if not SERVER.search(c)]
TRAIN = commands(("psn train", ".venv/bin/psn train", "python -m model.train", ".venv/bin/python -m model.train"))
EXPORT = commands(("python -m exported.export",))


def test_the_docs_have_examples_to_run():
    assert len(LOCAL_PYTHON) >= 2 and len(TRAIN) >= 3 and len(EXPORT) >= 3
    # the recipes of the shipped models that docs/training.md prints (in blocks that name no language)
    recipes = {argv[argv.index("--out") + 1] for where, argv in TRAIN if where.startswith("docs/training.md")}
    assert {"exported/mnist1d-sliding", "exported/japanesevowels-sliding"} <= recipes


@pytest.mark.parametrize("where,code", LOCAL_PYTHON, ids=[w for w, _ in LOCAL_PYTHON])
def test_python_example_runs(where, code):
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{where}:\n{proc.stderr[-3000:]}"


@pytest.mark.parametrize("where,argv", TRAIN, ids=[w for w, _ in TRAIN])
def test_training_command_passes_its_option_checks(where, argv):
    from model.train import parse_args

    for arg in argv:  # a data file the docs write in a python block first
        makers = [c for _, c in LOCAL_PYTHON if arg in c]
        if arg.startswith("/tmp/") and not Path(arg).exists() and makers:
            subprocess.run([sys.executable, "-c", makers[0]], cwd=REPO, check=True, timeout=120)
    a = parse_args(argv)  # exits with a usage error if an option is wrong or its data is missing
    assert a.epochs >= 1


@pytest.mark.parametrize("where,argv", EXPORT, ids=[w for w, _ in EXPORT])
def test_export_command_names_real_folders(where, argv):
    known = {"--all", "--no-parity", "--root", "--opset", "--samples"}
    options = [a for a in argv if a.startswith("--")]
    assert set(options) <= known, f"{where}: unknown options {set(options) - known}"
    takes_value = {"--root", "--opset", "--samples"}
    folders = [a for i, a in enumerate(argv) if not a.startswith("--") and argv[i - 1] not in takes_value]
    for folder in folders:
        if folder not in ("exported/foo",):  # the docs' placeholder name
            assert (REPO / folder / "config.json").is_file(), f"{where}: no model folder {folder}"



def test_every_setting_is_in_the_api_docs_with_its_default():
    """Each ``PSN_`` setting the service reads is named in docs/api.md, and where its row's default is one
    literal value (`` `300` ``, `` `false` ``) it is the code's default."""
    from service.config import Settings

    text = (REPO / "docs" / "api.md").read_text()
    missing = [f"PSN_{name.upper()}" for name in Settings.model_fields if f"PSN_{name.upper()}" not in text]
    assert not missing, f"settings docs/api.md does not name: {missing}"
    rows = dict(re.findall(r"^\| `(PSN_[A-Z0-9_]+)` \| `([^`|]*)` \|", text, flags=re.M))
    checked, wrong = 0, []
    for name, field in Settings.model_fields.items():
        doc = rows.get(f"PSN_{name.upper()}")
        if doc is None or field.default is None:
            continue
        code = field.default
        if isinstance(code, bool):
            same = doc == str(code).lower()
        elif isinstance(code, int | float):
            same = re.fullmatch(r"-?[0-9.e+]+", doc) is not None and float(doc) == code
        else:
            same = doc == str(code)
        if not same:
            wrong.append(f"PSN_{name.upper()}: `{doc}` in the docs, {code!r} in the code")
        checked += 1
    assert not wrong, f"docs/api.md defaults that are not the code's: {wrong}"
    assert checked >= 20, f"only {checked} defaults found in docs/api.md's table: has its format changed?"


def test_the_docker_docs_name_every_setting_the_compose_file_passes():
    """docs/docker.md's settings paragraph (the container-side ones, then "Passed through") lists exactly the
    service's environment of
    docker-compose.yml (a setting added to one and not the other made the docs wrong twice)."""
    compose = (REPO / "docker-compose.yml").read_text()
    env = compose.split("    environment:", 1)[1].split("    healthcheck:", 1)[0]
    passed = set(re.findall(r"^\s+- (PSN_[A-Z0-9_]+)", env, flags=re.M))
    text = (REPO / "docs" / "docker.md").read_text()
    para = text.split("Service settings are", 1)[1].split("To set another one", 1)[0]
    named = set(re.findall(r"`(PSN_[A-Z0-9_]+)", para))
    assert len(passed) >= 20, f"only {len(passed)} settings found in docker-compose.yml: has its format changed?"
    assert named == passed, f"compose only: {sorted(passed - named)}; docs only: {sorted(named - passed)}"
