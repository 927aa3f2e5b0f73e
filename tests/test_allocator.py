"""utils/allocator.py: with glibc's freed memory kept, a large buffer freed and allocated again is not faulted in
afresh, the model's outputs are unchanged, and settings the user made in the environment win.

Each case runs in its own Python process: the setting is process-wide and cannot be undone."""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, run_entry

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                reason="the allocator setting applies to glibc on Linux only")

BUFFER_BYTES = 64 * 2**20  # above glibc's largest dynamic mmap threshold (32 MiB): mmap'd fresh by default
PAGE_BYTES = 4096

PROBE = """
import json, resource, sys
import torch
from utils.allocator import allocator_state, keep_freed_memory
if sys.argv[1] == "keep":
    keep_freed_memory()

def faults(fn):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

touch = lambda: torch.empty(%d // 4).fill_(1.0)  # allocated, every page written, freed
for _ in range(10):  # glibc settles its free lists over the first few (with kept memory: about 5)
    touch()
# the fewest of five: a memory reclaimer of the host (DAMON's pageout, say) can page the kept buffer out between
# two passes, which faults it in again once without saying anything about the allocator
steady = min(faults(touch) for _ in range(5))
if len(sys.argv) > 2:  # the model's outputs, to compare between the two settings
    torch.manual_seed(0)
    from model import build_model
    model = build_model("efficient_mtnet").eval()
    with torch.no_grad():
        torch.save(model(torch.randn(2, 3, 96, 96)), sys.argv[2])
print(json.dumps({"faults": steady, "state": allocator_state()}))
""" % BUFFER_BYTES


def _probe(mode: str, outputs: Path | None = None, env_extra: dict | None = None) -> dict:
    """Page faults of a steady-state reallocation and the allocator state, in a fresh process; with `outputs`,
    EfficientMTNet's outputs on a fixed input are saved there."""
    proc = run_entry(["-c", PROBE, mode, *([str(outputs)] if outputs else [])], cwd=REPO, env_extra=env_extra)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _transparent_huge_pages_always() -> bool:
    try:
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


def test_kept_memory_is_reused_without_page_faults_and_outputs_are_unchanged(tmp_path: Path):
    default = _probe("default", tmp_path / "default.pt")
    kept = _probe("keep", tmp_path / "keep.pt")
    out_default, out_kept = torch.load(tmp_path / "default.pt", weights_only=True), torch.load(
        tmp_path / "keep.pt", weights_only=True)
    pages = BUFFER_BYTES // PAGE_BYTES  # 16,384 pages of 4 KiB
    assert default["state"] == "default"
    assert kept["state"] == "glibc, freed memory kept up to 1024 MiB"
    if not _transparent_huge_pages_always():  # with huge pages everywhere, a fresh mapping faults 512x less
        assert default["faults"] >= 0.9 * pages  # unmapped on free, every page faulted in again
    assert kept["faults"] < 0.01 * pages  # freed memory is handed out again
    # only where the memory comes from changes, not a single output value
    assert out_default.keys() == out_kept.keys() == {"cls", "seg"}
    assert all(torch.equal(out_default[k], out_kept[k]) for k in out_default)


def test_malloc_settings_from_the_environment_win():
    found = _probe("keep", env_extra={"MALLOC_TRIM_THRESHOLD_": "131072"})
    assert found["state"] == "glibc, MALLOC_* settings from the environment"
    assert found["faults"] >= 0.9 * BUFFER_BYTES // PAGE_BYTES or _transparent_huge_pages_always()
