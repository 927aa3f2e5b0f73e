"""A corrupt run folder (a truncated history.json, a deleted split.json, a config.yaml edited into something
invalid): resuming it says what is wrong and what to do in one line, exit 2, and writes nothing; test.py, which
takes its config from the checkpoint, still evaluates (or names the missing split). Real entry points."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.faults_common import one_error_line, train, train_args
from tests.helpers import REPO, run_entry


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(data root, work dir, run dir) of a 2-epoch run."""
    base = tmp_path_factory.mktemp("faults_run")
    data, work = base / "data", base / "runs"
    proc = train(data, work, 2)
    assert proc.returncode == 0, proc.stderr
    return data, work, (work / "demo" / "latest").resolve()


def _copy(run: Path, where: Path) -> tuple[Path, dict]:
    copy = where / run.name
    shutil.copytree(run, copy)
    return copy, {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()}


def _resume(data: Path, work: Path, run: Path, *extra: str):
    return run_entry(train_args(data, work, 3, "--resume", str(run), *extra), cwd=REPO)


def _unchanged(run: Path, before: dict) -> None:
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert after == before, "a refused resume changed the run folder"


def test_truncated_history_json(finished_run, tmp_path):
    data, work, run = finished_run
    copy, before = _copy(run, tmp_path)
    (copy / "history.json").write_bytes(before["history.json"][:60])  # cut mid-way, as a full disk or crash would
    before["history.json"] = (copy / "history.json").read_bytes()
    line = one_error_line(_resume(data, work, copy))
    assert "history.json (the per-epoch history) is truncated or not valid JSON" in line
    assert "history.csv" in line  # what to do: the same rows are there
    _unchanged(copy, before)
    test = run_entry(["test.py", "--checkpoint", str(copy / "best.pth"), "--split", "val", "--bootstrap", "0",
                      "--no-progress"], cwd=REPO)
    assert test.returncode == 0, test.stderr  # test.py does not need the history


def test_deleted_split_json(finished_run, tmp_path):
    data, work, run = finished_run
    copy, before = _copy(run, tmp_path)
    (copy / "split.json").unlink()
    del before["split.json"]
    line = one_error_line(_resume(data, work, copy))
    assert "has no split.json" in line and "would draw a new one" in line and "data.split.file" in line
    _unchanged(copy, before)
    test = run_entry(["test.py", "--checkpoint", str(copy / "best.pth"), "--split", "val", "--bootstrap", "0",
                      "--no-progress"], cwd=REPO)
    assert "split file" in one_error_line(test)


def test_config_yaml_edited_into_invalid_yaml_or_values(finished_run, tmp_path):
    data, work, run = finished_run
    for name, text, expected in (("yaml", "data: {image_size: [oops\n", "is not valid YAML"),
                                 ("value", "data:\n  preprocess:\n    image_size: -5\n", "'data.preprocess.image_size': got -5")):
        copy, before = _copy(run, tmp_path / name)
        (copy / "config.yaml").write_text(text)
        before["config.yaml"] = text.encode()
        line = one_error_line(_resume(data, work, copy))
        assert f"{copy / 'config.yaml'} is not a valid config" in line and expected in line
        assert "undo the edit or delete the file" in line
        _unchanged(copy, before)
        # The same file given as --config (as the Ctrl-C message suggests): one line too.
        line = one_error_line(run_entry(["train.py", "--config", str(copy / "config.yaml"), "--resume",
                                         str(copy / "last.pth")], cwd=REPO))
        assert expected.split(":")[0] in line
        test = run_entry(["test.py", "--checkpoint", str(copy / "best.pth"), "--split", "val", "--bootstrap",
                          "0", "--no-progress"], cwd=REPO)
        assert test.returncode == 0, test.stderr  # the checkpoint carries the config


def test_a_sound_copy_resumes(finished_run, tmp_path):
    """The control: the same copy, untouched, resumes to epoch 3 with its history continued."""
    data, work, run = finished_run
    copy, _ = _copy(run, tmp_path)
    proc = _resume(data, work, copy)
    assert proc.returncode == 0, proc.stderr
    assert [row["epoch"] for row in json.loads((copy / "history.json").read_text())] == [1, 2, 3]
