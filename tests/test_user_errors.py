"""A user's mistakes get one clear line: config ranges and choices from the schema, where a value came from,
model names, devices, argument ranges, checkpoints, and the common `error: ...` / exit 2 of every entry point."""
from __future__ import annotations

import dataclasses
import importlib.util
import typing
import zipfile

import pytest
import torch

import benchmark
import train as train_entry
from datasets import check as check_entry
from datasets import synthetic as synthetic_entry
from datasets.errors import DataError
from evaluation import readme_table as results_entry
from model import build_model, check_model_name, list_models
from tests.helpers import REPO, run_entry
from utils import runtime
from utils.checkpoint import CheckpointError, read_checkpoint, resolve_checkpoint_arg
from utils.cli import run_main
from utils.config import Config, ConfigError, check_values, config_from_dict, load_config
from visualization import __main__ as visualization_entry

DEMO = REPO / "configs" / "demo.yaml"
# test.py by its path: the name `test` is also a package of the standard library.
_spec = importlib.util.spec_from_file_location("test_entry", REPO / "test.py")
test_entry = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(test_entry)


# --------------------------------------------------------------------------------------------- schema
@pytest.mark.parametrize("override,expected", [
    ("data.loader.batch_size=0", "an integer >= 1"),
    ("data.loader.batch_size=-4", "an integer >= 1"),
    ("optim.lr=-0.01", "a number > 0"),
    ("optim.lr=0", "a number > 0"),
    ("loss.seg_weight=-1", "a number >= 0"),
    ("loss.aux_weights=[0.4,-0.2]", "a list of numbers >= 0"),
    ("data.augment.p_hflip=1.5", "a number >= 0.0 and <= 1.0"),
    ("eval.threshold=1", "a number > 0 and < 1"),
    ("data.augment.crop_scale=[0.9,0.5]", "a pair [low, high] with low <= high"),
    ("data.loader.cache=gpu", "one of none, ram, disk"),
    ("optim.name=adamx", "one of adamw, adam, sgd"),
    ("sched.name=linear", "one of cosine, plateau, step, none"),
    ("train.device=gpu", "auto, cpu, cuda, cuda:N or mps"),
    ("train.ema_decay=1", "a number > 0 and < 1"),
    ("experiment.name=a/b", "letters, digits"),
    ("data.preprocess.in_channels=2", "one of 1, 3"),
    ("data.preprocess.std=[0.2,0,0.2]", "a list of numbers > 0"),
])
def test_bad_value_names_key_value_rule_and_origin(override, expected):
    key, value = override.split("=", 1)
    with pytest.raises(ConfigError) as info:
        config_from_dict({}, [override])
    message = str(info.value)
    assert f"config key '{key}'" in message and expected in message, message
    assert message.endswith(f"(from --opts {override})"), message


def test_value_from_the_yaml_file_names_the_file_and_an_override_names_opts(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("data:\n  loader:\n    batch_size: 0\n")
    with pytest.raises(ConfigError, match=r"'data.loader.batch_size': got 0; .*\(in .*exp.yaml\)$"):
        load_config(path)
    # A bad override on a good file: the override is named, not the file (it used to say "in demo.yaml").
    with pytest.raises(ConfigError) as info:
        load_config(DEMO, ["train.epochs=0"])
    assert str(info.value).endswith("(from --opts train.epochs=0)") and "demo.yaml" not in str(info.value)
    # The last word wins: a bad file value fixed on the command line is fine.
    assert load_config(path, ["data.loader.batch_size=2"]).data.loader.batch_size == 2


def test_rules_across_loss_keys_are_checked_at_load():
    """They used to surface only when the trainer built the loss, as a ValueError traceback."""
    with pytest.raises(ConfigError, match="'loss.cls_weight' and 'loss.seg_weight' are both 0"):
        config_from_dict({}, ["loss.cls_weight=0", "loss.seg_weight=0"])
    with pytest.raises(ConfigError, match="'loss.seg' has no term with a positive weight"):
        config_from_dict({"loss": {"seg": {"bce": 0, "dice": 0}}})


def test_every_schema_field_declares_what_is_valid():
    """Every field that is not a flag, a section or a free mapping carries rules, and the defaults fit them."""
    def walk(node, prefix=""):
        hints = typing.get_type_hints(type(node))
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                yield from walk(value, f"{prefix}{f.name}.")
            elif hints[f.name] not in (bool, dict):
                yield f"{prefix}{f.name}", f.metadata.get("rules")

    undeclared = [key for key, rules in walk(Config()) if not rules]
    assert not undeclared, f"fields without declared rules: {undeclared}"
    check_values(Config())


# --------------------------------------------------------------------------------------------- model, device
def test_unknown_model_name_is_a_config_error_with_a_suggestion():
    with pytest.raises(ConfigError) as info:
        check_model_name("efficientmtnet")
    assert str(info.value) == ("model.name 'efficientmtnet' is not a registered model; did you mean "
                               "'efficient_mtnet'? (python -c \"from model import list_models; "
                               "print(list_models())\")")
    with pytest.raises(KeyError, match="efficient_mtnt"):  # still a KeyError for library callers
        build_model("efficient_mtnt")
    check_model_name(list_models()[0])


def test_missing_gpu_is_a_config_error_naming_the_key(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ConfigError, match=r"train.device='cuda' but no CUDA GPU"):
        runtime.select_device("cuda")
    with pytest.raises(ConfigError, match=r"--device='cuda:3'"):
        runtime.select_device("cuda:3", key="--device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"train.device='cuda:3' but this machine has 1 CUDA GPU"):
        runtime.select_device("cuda:3")
    assert runtime.select_device("cpu").type == "cpu"


# --------------------------------------------------------------------------------------------- entry points
def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: "), err
    return err


@pytest.mark.parametrize("opts,needle", [
    (["data.loader.batch_size=0"], "'data.loader.batch_size': got 0"),
    (["optim.lr=-0.01"], "'optim.lr': got -0.01"),
    (["loss.seg_weight=-1"], "'loss.seg_weight': got -1.0"),
    (["model.name=efficientmtnet"], "did you mean 'efficient_mtnet'"),
])
def test_train_prints_one_line_and_exits_2(opts, needle, tmp_path, capsys):
    argv = ["--config", str(DEMO), "--opts", f"experiment.work_dir={tmp_path / 'runs'}", *opts]
    assert run_main(train_entry.main, argv) == 2
    assert needle in _one_line_error(capsys)
    assert not (tmp_path / "runs").exists()


def test_train_without_the_gpu_it_asks_for(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    argv = ["--config", str(DEMO), "--opts", f"experiment.work_dir={tmp_path}", "train.device=cuda"]
    assert run_main(train_entry.main, argv) == 2
    assert "train.device='cuda'" in _one_line_error(capsys)


def test_debug_shows_the_traceback(monkeypatch):
    argv = ["--config", str(DEMO), "--opts", "data.loader.batch_size=0"]
    with pytest.raises(ConfigError):
        run_main(train_entry.main, [*argv, "--debug"])
    monkeypatch.setenv("EFFICIENT_MTNET_DEBUG", "1")
    with pytest.raises(ConfigError):
        run_main(train_entry.main, argv)


def test_every_entry_point_turns_a_user_error_into_one_line(tmp_path, capsys):
    missing = tmp_path / "missing"
    cases = [
        (test_entry.main, ["--checkpoint", str(missing / "best.pth")], "does not exist"),
        (synthetic_entry.main, ["--out", str(tmp_path)], "already exists"),
        (check_entry.main, [str(missing)], None),  # a report, not an exception: exit 1
        (visualization_entry.main, ["curves", "--run", str(missing)], "history"),
        (results_entry.main, [str(missing)], "missing"),
        (benchmark.main, ["--models", "efficientmtnet", "--device", "cpu", "--out", str(tmp_path / "b")],
         "--models 'efficientmtnet' is not a registered model"),
    ]
    for main, argv, needle in cases:
        code = run_main(main, argv)
        if needle is None:
            assert code == 1
            capsys.readouterr()
            continue
        assert code == 2, (main.__module__, code)
        assert needle in _one_line_error(capsys), main.__module__


class _Unreadable(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int):
        raise DataError(f"cannot decode image 'x{i}.jpg': empty, truncated or not an image file")


def test_a_data_error_in_a_loader_worker_is_one_line(capsys):
    """The worker's traceback, which the DataLoader puts into the re-raised error's message, is not shown."""
    def main(argv):
        next(iter(torch.utils.data.DataLoader(_Unreadable(), num_workers=1)))

    assert run_main(main, []) == 2
    assert _one_line_error(capsys) == "error: cannot decode image 'x0.jpg': empty, truncated or not an image file"


def test_script_exit_status_and_message_without_traceback(tmp_path):
    """The real `python train.py` process, as a user runs it."""
    proc = run_entry([str(REPO / "train.py"), "--config", str(DEMO), "--opts", "data.loader.batch_size=0"], cwd=tmp_path,
                     timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("error: config key 'data.loader.batch_size': got 0; expected an integer >= 1 "
                                   "(from --opts data.loader.batch_size=0)")


@pytest.mark.parametrize("argv,needle", [
    (["--threshold", "1.5"], "--threshold: expected a number strictly between 0 and 1, got 1.5"),
    (["--threshold", "0"], "--threshold: expected a number strictly between 0 and 1"),
    (["--batch-size", "0"], "--batch-size: expected an integer >= 1, got 0"),
    (["--batch-size", "-1"], "--batch-size: expected an integer >= 1, got -1"),
    (["--num-workers", "-1"], "--num-workers: expected an integer >= 0, got -1"),
    (["--gradcam", "-2"], "--gradcam: expected an integer >= 0"),
])
def test_test_py_arguments_have_ranges(argv, needle, capsys):
    with pytest.raises(SystemExit) as info:
        test_entry.parse_args(["--checkpoint", "x.pth", *argv])
    assert info.value.code == 2 and needle in capsys.readouterr().err
    assert test_entry.parse_args(["--checkpoint", "x.pth", "--batch-size", "1", "--threshold", "0.3"]).batch_size == 1


# --------------------------------------------------------------------------------------------- checkpoints
def test_a_text_file_named_pth_is_not_a_checkpoint(tmp_path):
    text = tmp_path / "x.pth"
    text.write_text("these are my notes\n")
    with pytest.raises(CheckpointError, match=r"'.*x.pth' is not a PyTorch checkpoint \(19 bytes starting with"):
        read_checkpoint(text)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint \\(an empty file"):
        read_checkpoint(empty)
    archive = tmp_path / "real.pth"
    torch.save({"model": {}, "config": {}}, archive)
    assert zipfile.is_zipfile(archive) and read_checkpoint(archive)["model"] == {}


def test_checkpoint_argument_may_be_a_run_folder(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(CheckpointError, match="is a folder without best.pth; expected a checkpoint file"):
        resolve_checkpoint_arg(run)
    with pytest.raises(CheckpointError, match="is a folder; expected a checkpoint file"):
        read_checkpoint(run)
    (run / "best.pth").write_bytes(b"")
    assert resolve_checkpoint_arg(run) == run / "best.pth"
    assert f"using {run / 'best.pth'}" in capsys.readouterr().out
    assert resolve_checkpoint_arg(run / "last.pth") == run / "last.pth"
