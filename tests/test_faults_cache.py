"""Faults of the disk cache (`data.loader.cache: disk`): a writer killed halfway, a file truncated or corrupted after a
crash, a file from another config or format version, a disk that fills up. Each is done for real (SIGKILL of
a process in the middle of the write; a 2 MiB tmpfs for the full disk, skipped where mounting is not allowed)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from datasets.cache import HEADER_BYTES, ArrayCache, read_header
from datasets.decode import load_sample
from datasets.index import index_split
from tests.faults_common import tmpfs_volume
from tests.helpers import REPO
from utils.disk import DiskFullError


@pytest.fixture(scope="module")
def samples(tiny_brisc):
    return index_split(tiny_brisc, "train")


def _decoded(samples, size: int, resize: str = "stretch") -> list[tuple[np.ndarray, np.ndarray]]:
    return [load_sample(s, size, resize) for s in samples]


def _assert_rows_match(cache: ArrayCache, expected) -> None:
    for i, (image, mask) in enumerate(expected):
        got_image, got_mask = cache.get(i)
        assert np.array_equal(got_image, image) and np.array_equal(got_mask, mask), f"row {i} differs"


def test_writer_killed_halfway_leaves_nothing_readable_and_the_next_run_rebuilds(tiny_brisc, samples, tmp_path,
                                                                                capfd):
    cache_dir = tmp_path / "cache"
    # A writer slowed down per image (the decode itself is the real one), killed with SIGKILL mid-way.
    script = textwrap.dedent(f"""
        import time, datasets.cache as cache
        from datasets.index import index_split
        real = cache.load_sample
        def slow(*args):
            time.sleep(0.15)
            return real(*args)
        cache.load_sample = slow
        cache.ArrayCache(index_split({str(tiny_brisc)!r}, "train"), 48, "disk", {str(cache_dir)!r}, split="train")
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    writer = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not list(cache_dir.glob(".*.tmp")):
        assert writer.poll() is None, writer.stderr.read().decode()
        time.sleep(0.05)
    time.sleep(1.0)  # some rows written, most not (48 images at 0.15 s over at most 4 threads: >= 1.8 s)
    assert writer.poll() is None, "the writer finished before it could be killed"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    leftovers = list(cache_dir.glob(".*.tmp"))
    assert len(leftovers) == 1 and not list(cache_dir.glob("*.cache"))  # only the partial temporary file

    capfd.readouterr()
    cache = ArrayCache(samples, 48, "disk", cache_dir, split="train", verbose=False)
    assert "removed" in capfd.readouterr().err  # the killed writer's temporary file, named
    assert not list(cache_dir.glob(".*.tmp")) and cache.path.is_file()
    _assert_rows_match(cache, _decoded(samples, 48))


def test_truncated_corrupt_or_headerless_files_are_rebuilt_never_read(samples, tmp_path, capfd):
    cache = ArrayCache(samples, 40, "disk", tmp_path, split="train", verbose=False)
    path, good = cache.path, cache.path.read_bytes()
    expected = _decoded(samples, 40)
    damages = {
        "truncated": lambda: path.write_bytes(good[: len(good) // 2]),  # a copy or write cut short
        "corrupt": lambda: path.write_bytes(good[:HEADER_BYTES] + bytes(len(good) - HEADER_BYTES)),  # zero pages
        "no valid header": lambda: path.write_bytes(bytes(HEADER_BYTES) + good[HEADER_BYTES:]),  # header unwritten
    }
    for what, damage in damages.items():
        damage()
        capfd.readouterr()
        rebuilt = ArrayCache(samples, 40, "disk", tmp_path, split="train", verbose=False)
        notice = capfd.readouterr().err.strip().splitlines()
        assert len(notice) == 1 and what in notice[0] and "rebuilding" in notice[0], (what, notice)
        assert path.read_bytes() == good
        _assert_rows_match(rebuilt, expected)


def test_a_cache_of_another_config_or_version_is_never_read(samples, tmp_path, capfd):
    stretch = ArrayCache(samples, 40, "disk", tmp_path, split="train", verbose=False)
    letterbox = ArrayCache(samples, 40, "disk", tmp_path, split="train", verbose=False, resize="letterbox")
    assert stretch.path != letterbox.path
    _assert_rows_match(letterbox, _decoded(samples, 40, "letterbox"))
    # The stretch file put under the letterbox file's name (a copied cache folder, a hash clash): the header says
    # it was made with other settings, so it is rebuilt, not read.
    shutil.copyfile(stretch.path, letterbox.path)
    capfd.readouterr()
    again = ArrayCache(samples, 40, "disk", tmp_path, split="train", verbose=False, resize="letterbox")
    notice = capfd.readouterr().err
    assert "stale" in notice and "letterbox" in notice
    _assert_rows_match(again, _decoded(samples, 40, "letterbox"))
    # An older format version under the current name: stale too.
    header = read_header(stretch.path)
    raw = bytearray(stretch.path.read_bytes())
    raw[: raw.index(b"}") + 1] = raw[: raw.index(b"}") + 1].replace(
        f'"format_version": {header["format_version"]}'.encode(), b'"format_version": 2')
    stretch.path.write_bytes(bytes(raw))
    capfd.readouterr()
    ArrayCache(samples, 40, "disk", tmp_path, split="train", verbose=False)
    assert "stale (its format_version is 2" in capfd.readouterr().err


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MiB file system (tmpfs), unmounted afterwards."""
    yield from tmpfs_volume(tmp_path, "2m")


def test_full_disk_while_caching_is_one_clear_error_and_leaves_no_partial_file(samples, small_disk):
    # 48 images at 256 px need about 3.4 MiB: more than the 2 MiB disk holds.
    with pytest.raises(DiskFullError) as caught:
        ArrayCache(samples, 256, "disk", small_disk / "cache", split="train", verbose=False)
    message = str(caught.value)
    assert "disk cache" in message and "MiB free" in message and "needs 3.4 MiB" in message
    assert not [p for p in (small_disk / "cache").iterdir()]  # no temporary or partial file left
    # Room for a smaller cache on the same disk: built and read normally.
    cache = ArrayCache(samples, 64, "disk", small_disk / "cache", split="train", verbose=False)
    _assert_rows_match(cache, _decoded(samples, 64))


def test_a_disk_that_fills_during_the_write_is_caught_too(samples, small_disk, monkeypatch):
    """The space check passes (another process fills the disk after it): the reserved space fails with ENOSPC."""
    import datasets.cache as cache_module

    monkeypatch.setattr(cache_module, "ensure_free_space", lambda *args: 10 << 20)
    with pytest.raises(DiskFullError, match="not enough disk space to write the disk cache"):
        ArrayCache(samples, 256, "disk", small_disk / "cache", split="train", verbose=False)
    assert not list((small_disk / "cache").iterdir())
