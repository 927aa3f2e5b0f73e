"""Two processes on one run: a second `--resume auto` (or `--resume RUN`) while the first still trains is refused
in one line naming the owner, writes nothing, and after the first is SIGKILLed its stale lock is taken over and
the run continues with a consistent history. The lock itself: refusal, stale lock, another host, release."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.faults_common import entry_env, one_error_line, train_args
from tests.helpers import REPO, run_entry
from utils.lock import LOCK_NAME, RunLock, RunLockedError, lock_holder, run_lock


def _hold_lock_in_child(run_dir: Path) -> subprocess.Popen:
    """Another process that takes the run's lock and keeps it until killed."""
    code = textwrap.dedent(f"""
        import time
        from utils.lock import RunLock
        RunLock({str(run_dir)!r}, "training").acquire()
        print("held", flush=True)
        time.sleep(600)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=entry_env(), stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_lock_refuses_while_held_and_takes_over_after_the_owner_is_killed(tmp_path, capfd):
    child = _hold_lock_in_child(tmp_path)
    try:
        with pytest.raises(RunLockedError) as caught:
            with run_lock(tmp_path, "test.py", hint="or pass --out DIR to write elsewhere"):
                pass
        message = str(caught.value)
        assert f"pid {child.pid} on host {socket.gethostname()}" in message and "in use by training" in message
        assert "--out DIR" in message and "\n" not in message
        assert lock_holder(tmp_path)["pid"] == child.pid
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == child.pid  # the file outlives its owner...
    assert lock_holder(tmp_path) is None  # ...but nobody holds it
    capfd.readouterr()
    with run_lock(tmp_path, "training") as lock:
        assert lock.held and json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
        assert f"took over the stale lock of training (pid {child.pid}" in capfd.readouterr().err
    assert not (tmp_path / LOCK_NAME).exists()  # released on exit


def test_a_lock_file_of_another_host_is_refused_with_what_to_do(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 4242, "host": "node-17", "purpose": "training",
                                                  "started": time.time()}))
    with pytest.raises(RunLockedError, match=f"cannot be checked from this host; if no process .* delete "
                                             f"'{tmp_path / LOCK_NAME}'"):
        RunLock(tmp_path, "training").acquire()


def test_released_when_the_block_raises(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with run_lock(tmp_path, "training"):
            1 / 0
    assert lock_holder(tmp_path) is None and not (tmp_path / LOCK_NAME).exists()


def test_resume_auto_started_twice(tmp_path):
    data, work = tmp_path / "data", tmp_path / "runs"
    first = subprocess.Popen([sys.executable, *train_args(data, work, 500, "--resume", "auto")], cwd=REPO,
                             env=entry_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        run = None
        deadline = time.time() + 180
        while run is None or not (run / "last.pth").is_file():  # the first epoch is saved: a resumable run
            runs = [p for p in (work / "demo").iterdir() if p.is_dir() and not p.is_symlink()] \
                if (work / "demo").is_dir() else []
            run = runs[0] if runs else None
            assert first.poll() is None and time.time() < deadline, first.stderr.read() if first.poll() else "slow"
            time.sleep(0.2)
        commands = (run / "command.txt").read_text()

        second = run_entry(train_args(data, work, 500, "--resume", "auto"), cwd=REPO)
        line = one_error_line(second)
        assert f"{run}, is still in use by training (pid {first.pid} on host {socket.gethostname()})" in line
        third = run_entry(train_args(data, work, 500, "--resume", str(run)), cwd=REPO)
        line = one_error_line(third)
        assert f"'{run}' is in use by training (pid {first.pid}" in line
        assert (run / "command.txt").read_text() == commands  # neither wrote into the run
        assert len([p for p in (work / "demo").iterdir() if not p.is_symlink()]) == 1  # nor started another
    finally:
        first.send_signal(signal.SIGKILL)  # the owner dies without cleaning up: a stale lock stays behind
        first.wait()

    import torch

    done = torch.load(run / "last.pth", weights_only=True)["epoch"]
    resumed = run_entry(train_args(data, work, done + 1, "--resume", "auto"), cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr
    assert f"took over the stale lock of training (pid {first.pid}" in resumed.stderr
    history = json.loads((run / "history.json").read_text())
    assert [row["epoch"] for row in history] == list(range(1, done + 2))  # one writer at a time: no interleaving
    assert torch.load(run / "last.pth", weights_only=True)["epoch"] == done + 1
    assert not (run / LOCK_NAME).exists()


def test_test_py_while_training_holds_the_lock(tmp_path, tiny_brisc):
    """test.py writing into a run whose lock another process (training) holds refuses, naming the owner."""
    from tests.helpers import save_untrained_checkpoint

    run = tmp_path / "run"
    run.mkdir()
    checkpoint = save_untrained_checkpoint(tiny_brisc, run)
    child = _hold_lock_in_child(run)
    try:
        proc = run_entry(["test.py", "--checkpoint", str(checkpoint), "--bootstrap", "0", "--no-progress"],
                         cwd=REPO)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert "in use by training" in one_error_line(proc)
