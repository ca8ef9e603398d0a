"""``service.memory.keep_freed_memory``: with it, a process that allocates and frees the same blocks batch
after batch (as the engine core does) stops page-faulting them in again; the kernel's own count of page
faults (``getrusage``) is the reference. Each case runs in a fresh interpreter: the setting is per process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = """
import resource, sys
import numpy as np
from service.memory import keep_freed_memory
applied = keep_freed_memory(int(sys.argv[1]))
def batch():  # 8 x 4 MB alive at once, then all freed: more than glibc's default trim threshold
    blocks = [np.ones(1 << 20, np.float32) for _ in range(8)]
    del blocks
batch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    batch()
print(int(applied), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(keep_mb: int, **env: str) -> tuple[bool, int]:
    base = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(keep_mb)], capture_output=True, text=True, check=True,
                         cwd=REPO, env={**base, **env}, timeout=60).stdout.split()
    return bool(int(out[0])), int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_kept_memory_is_reused_without_page_faults():
    applied, kept = faults(256)
    off, default = faults(0)
    assert applied and not off
    # 10 batches of 32 MB are 80k pages: with glibc's defaults each batch faults most of them in again
    assert default > 20_000, f"glibc's defaults faulted only {default} pages: the check below would prove nothing"
    assert kept < default / 20, f"{kept} page faults with freed memory kept, {default} without"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
@pytest.mark.parametrize("env", [{"MALLOC_TRIM_THRESHOLD_": "1"}, {"MALLOC_MMAP_THRESHOLD_": "131072"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}])
def test_the_environments_malloc_settings_win(env: dict[str, str]):
    applied, _ = faults(256, **env)
    assert not applied


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_an_empty_malloc_variable_is_no_setting():
    """As a compose file passes a variable it has no value for."""
    applied, _ = faults(256, MALLOC_TRIM_THRESHOLD_="")
    assert applied


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
@pytest.mark.parametrize("keep_mb", [4096, 4100])
def test_more_than_mallopt_takes_keeps_as_much_as_it_takes(keep_mb: int) -> None:
    """mallopt's value is a C int: PSN_MALLOC_KEEP_MB=4096 wrapped to a trim threshold of 0 (4100: 4 MB), so
    every batch was handed back and faulted in again, as with glibc's defaults, while the engine core logged
    the memory as kept. Past 2047 MB the thresholds are now mallopt's largest."""
    applied, kept = faults(keep_mb)
    _, default = faults(0)
    assert applied and kept < default / 20, (kept, default)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_keep_mb_is_how_many_megabytes_are_kept() -> None:
    """Each batch frees 32 MB at once: 48 MB kept holds them, 30 MB does not (glibc trims past the threshold)."""
    _, kept = faults(48)
    _, trimmed = faults(30)
    assert trimmed > 20_000 and kept < trimmed / 20, (kept, trimmed)
