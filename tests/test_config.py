"""Config schema: YAML loading, typed overrides and the errors a user meets."""
from pathlib import Path

import pytest
import yaml

from utils.config import Config, ConfigError, config_from_dict, load_config, save_config

REPO = Path(__file__).resolve().parents[1]


def test_defaults_and_yaml_merge(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("experiment:\n  name: x\ntrain:\n  epochs: 3\nloss:\n  seg:\n    focal: 0.5\n")
    cfg = load_config(path)
    assert cfg.experiment.name == "x" and cfg.train.epochs == 3 and cfg.loss.seg.focal == 0.5
    assert cfg.data.loader.batch_size == Config().data.loader.batch_size  # untouched keys keep their defaults


def test_overrides_are_typed():
    cfg = config_from_dict({}, ["train.epochs=5", "optim.lr=3e-4", "data.root=/data/brisc2025",
                                "loss.seg.dice=1", "loss.aux_weights=[0.5,0.25]", "train.ema=true"])
    assert cfg.train.epochs == 5 and isinstance(cfg.train.epochs, int)
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.loss.seg.dice == 1.0 and isinstance(cfg.loss.seg.dice, float)  # int accepted for a float key
    assert cfg.loss.aux_weights == [0.5, 0.25] and cfg.train.ema is True
    assert cfg.data.root == "/data/brisc2025"


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.epoch'.*Did you mean 'train.epochs'"):
        config_from_dict({}, ["train.epoch=5"])
    with pytest.raises(ConfigError, match=r"'optimizer'.*Did you mean 'optim'"):
        config_from_dict({"optimizer": {"lr": 1}})


def test_wrong_type_and_value_say_what_is_allowed():
    with pytest.raises(ConfigError, match=r"'train.epochs'.*expected int"):
        config_from_dict({}, ["train.epochs=many"])
    with pytest.raises(ConfigError, match=r"'data.loader.cache'.*expected one of none, ram, disk"):
        config_from_dict({}, ["data.loader.cache=gpu"])
    with pytest.raises(ConfigError, match=r"'loss.class_weights'"):
        config_from_dict({}, ["loss.class_weights=[1,2]"])
    with pytest.raises(ConfigError, match="mapping"):
        config_from_dict({"train": 3})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_save_and_reload_roundtrip(tmp_path):
    cfg = config_from_dict({}, ["train.epochs=7", "loss.class_weights=balanced"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def _is_runs_file(path: Path) -> bool:
    """A sweep's runs file (`runs:` at the top; checked in tests/test_sweep.py) or an external-set file
    (`external:`; tests/test_sweep_external.py), not an experiment config."""
    return bool({"runs", "external"} & set(yaml.safe_load(path.read_text(encoding="utf-8")) or {}))


@pytest.mark.parametrize("path", [p for p in sorted((REPO / "configs").rglob("*.yaml")) if not _is_runs_file(p)],
                         ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    load_config(path)


def test_dotted_override_sets_one_entry_of_model_kwargs():
    cfg = config_from_dict({"model": {"kwargs": {"ham_rank": 8}}},
                           ["model.kwargs.context=none", "model.kwargs.se=false"])
    assert cfg.model.kwargs == {"ham_rank": 8, "context": "none", "se": False}
    assert config_from_dict({"model": {"kwargs": {"ham_rank": 8}}}, ["model.kwargs={}"]).model.kwargs == {}


def test_flat_data_keys_of_older_configs_and_checkpoints_are_read_in_their_sections(tmp_path, capsys):
    """Configs and checkpoints written before the data section had sections keep loading."""
    flat = {"image_size": 96, "batch_size": 4, "synthetic": True, "synthetic_train": 8, "split_seed": 3,
            "train_dir": "Train", "class_map": {"notumor": "no_tumor"}, "folds": 2, "fold": 1, "augment": {"p_hflip": 0.1}}
    from_checkpoint = config_from_dict({"data": flat})  # a checkpoint's config: no source, no note
    assert capsys.readouterr().err == ""
    data = from_checkpoint.data
    assert (data.preprocess.image_size, data.loader.batch_size, data.generated.enabled, data.generated.train,
            data.split.seed, data.layout.train_dir, data.layout.class_map, data.split.folds, data.split.fold,
            data.augment.p_hflip) == (96, 4, True, 8, 3, "Train", {"notumor": "no_tumor"}, 2, 1, 0.1)
    path = tmp_path / "old.yaml"
    path.write_text("data:\n  image_size: 96\n  loader:\n    num_workers: 0\n")
    cfg = load_config(path, ["data.batch_size=5", "data.class_map.tumor=glioma"])
    assert (cfg.data.preprocess.image_size, cfg.data.loader.num_workers, cfg.data.loader.batch_size,
            cfg.data.layout.class_map) == (96, 0, 5, {"tumor": "glioma"})
    err = capsys.readouterr().err
    assert "'data.image_size' is now 'data.preprocess.image_size' (in " in err
    assert "'data.batch_size' is now 'data.loader.batch_size' (from --opts data.batch_size=5)" in err
    # a run's own config.yaml written by an older version: read silently, like its checkpoint
    saved = tmp_path / "config.yaml"
    saved.write_text("data:\n  image_size: 80\n  synthetic: true\n")
    assert load_config(saved, saved_by_a_run=True).data.preprocess.image_size == 80
    assert capsys.readouterr().err == ""
    # a bad value under an old key is reported under its new name, with its origin
    with pytest.raises(ConfigError, match=r"'data.loader.batch_size': got 0; .*\(from --opts data.batch_size=0\)"):
        config_from_dict({}, ["data.batch_size=0"])


def test_config_validator_comparison_script_runs():
    """scripts/compare_config_validators.py: the measurement behind docs/configuration.md's choice."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "compare_config_validators.py"
    spec = importlib.util.spec_from_file_location("compare_config_validators", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        module.main(["--config", str(script.parents[1] / "configs" / "demo.yaml"), "--repeats", "2"])
    text = out.getvalue()
    assert "Did you mean 'train.epochs'?" in text and "pydantic:     (accepted)" in text  # the low > high pair
