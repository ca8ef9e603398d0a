"""Settings (``service/config.py``) read from PSN_* variables: where each bounded one starts and stops being
accepted, and what ``--help`` / ``-h`` prints."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.config import Settings, check_argv, settings_error

DOCS = Path(__file__).resolve().parents[2] / "docs" / "api.md"

# (setting, its last accepted value, the first value past it, which is refused)
EDGES = [
    ("port", 0, -1), ("port", 65535, 65536),  # 0: any free port
    ("workers", 1, 0), ("workers", 64, 65),
    ("idle_timeout_s", 0.001, 0), ("request_timeout_s", 0.001, 0), ("read_timeout_s", 0.001, 0),
    ("max_request_bytes", 1024, 1023), ("max_header_bytes", 1024, 1023),
    ("state_compact_bytes", 1 << 16, (1 << 16) - 1), ("cluster_session_records", 2, 1),
]


def refused(monkeypatch: pytest.MonkeyPatch, name: str, value: object) -> str:
    """The start-up error for ``PSN_<name>=value`` (the test fails if the value is accepted)."""
    monkeypatch.setenv(f"PSN_{name.upper()}", str(value))
    with pytest.raises(ValidationError) as e:
        Settings()
    return str(settings_error(e.value))


@pytest.mark.parametrize(("name", "ok", "bad"), EDGES)
def test_a_bounded_setting_takes_its_bound_and_refuses_the_value_past_it(monkeypatch: pytest.MonkeyPatch, name: str,
                                                                          ok: float, bad: float) -> None:
    monkeypatch.setenv(f"PSN_{name.upper()}", str(ok))
    assert getattr(Settings(), name) == ok
    assert refused(monkeypatch, name, bad).startswith(f"PSN_{name.upper()}: ")


@pytest.mark.parametrize("variable", ["PSN_TORCH_THREADS", "PSN_ONNX_THREADS"])
def test_thread_counts_take_the_range_the_docs_give(monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    row = next(line for line in DOCS.read_text().splitlines() if line.startswith(f"| `{variable}` |"))
    low, high = map(int, re.findall(r"\((\d+)-(\d+)\)", row)[0])
    name = variable.removeprefix("PSN_").lower()
    for ok in (low, high):
        monkeypatch.setenv(variable, str(ok))
        assert getattr(Settings(), name) == ok
    for bad in (low - 1, high + 1):
        assert refused(monkeypatch, name, bad).startswith(f"{variable}: ")


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_lists_every_setting_and_shows_an_empty_default_as_such(capsys: pytest.CaptureFixture[str],
                                                                       flag: str) -> None:
    with pytest.raises(SystemExit) as e:
        check_argv([flag], "prog", "What prog does.")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: prog\n\nWhat prog does.\n"), out
    shown = dict(re.findall(r"^  (PSN_[A-Z0-9_]+) +(.*)$", out, flags=re.M))
    assert set(shown) == {f"PSN_{name.upper()}" for name in Settings.model_fields}
    assert Settings.model_fields["allowed_origins"].default == ""
    assert shown["PSN_ALLOWED_ORIGINS"] == "(empty)"  # not a blank that reads as a line cut short
    assert shown["PSN_API_KEYS"] == "unset" and shown["PSN_WARMUP"] == "true"
