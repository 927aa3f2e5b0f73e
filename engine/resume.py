"""What `train.py --resume` does: pick the checkpoint, decide where the run continues and which new settings apply.

The contract (README, Training):
- `--resume RUN_DIR` or `RUN_DIR/last.pth` continues that run in place (same directory, history, `last.pth`).
- Any other checkpoint (`best.pth`, a copy) starts a NEW run directory initialised from it (weights, optimiser,
  schedule, epoch count and the history up to it); the old run is left untouched.
- `--resume auto` takes the newest run of the experiment. If it has no checkpoint yet (stopped during its first
  epoch) a new run starts from scratch; an older run is never picked in its place.
- A finished run (all epochs done, its time budget spent, early-stopped) is not trained further: "nothing to
  resume", naming its final checkpoint, unless the new settings lift the reason (more epochs, a larger budget,
  more patience).
- Settings may change on resume only for the keys in `RESUMABLE` (--opts, or a --config other than the one the
  run was started with); any other change is refused, naming the key.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from utils.checkpoint import config_of, read_checkpoint
from utils.lock import RunLockedError, lock_holder
from utils.runs import RunFolderError, read_history, read_json_file
from utils.config import Config, ConfigError, load_config, config_from_dict, config_to_dict, flatten_config, override_keys

# Keys (or whole sections, ending in '.') that may change when a run is resumed: how long, how it is logged
# and evaluated, how data is loaded. Everything else defines the experiment (model, data, split, loss, optimiser).
RESUMABLE = (
    "train.epochs", "train.time_budget_min", "train.early_stop_patience", "train.log_every_steps",
    "train.image_log_every", "train.threads", "train.device", "eval.",
    "data.loader.num_workers", "data.loader.pin_memory", "data.loader.cache", "data.loader.cache_dir",
)
# Keys that only locate the run (`--resume auto`), never compared.
_LOCATING = ("experiment.name", "experiment.work_dir")


@dataclass
class ResumePlan:
    checkpoint: Path
    cfg: Config  # the run's config with the accepted changes
    new_run: bool = False  # True: continue in a fresh run directory (the checkpoint is not the run's last.pth)
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # key -> (old, new), applied
    finished: Optional[str] = None  # why there is nothing left to train, or None


def _run_sort_key(path: Path) -> tuple:
    match = re.fullmatch(r"(.*?)(?:-(\d+))?", path.name)
    return (match.group(1), int(match.group(2) or 0))


def newest_run(work_dir: Union[str, Path], name: str) -> Optional[Path]:
    """The most recently started run directory of experiment `name` (with or without a checkpoint), or None."""
    base = Path(work_dir) / name
    if not base.is_dir():
        return None
    runs = [p for p in base.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")]
    return max(runs, key=_run_sort_key) if runs else None


def locate_checkpoint(resume: str, cfg: Config) -> tuple[Optional[Path], str]:
    """`auto|RUN_DIR|CHECKPOINT` -> (checkpoint or None for a new run, a sentence saying what and why)."""
    if resume == "auto":
        name, work_dir = cfg.experiment.name, cfg.experiment.work_dir
        run = newest_run(work_dir, name)
        if run is None:
            return None, f"--resume auto: no earlier run of '{name}' in {work_dir}; starting a new one"
        holder = lock_holder(run)
        if holder is not None:  # e.g. the same command started twice, or retried by a job scheduler
            raise RunLockedError(f"--resume auto: the newest run of '{name}', {run}, is still in use by "
                                 f"{holder.get('purpose', 'a process')} (pid {holder.get('pid')} on host "
                                 f"{holder.get('host')}): wait for it to finish or stop it, then resume again")
        if not (run / "last.pth").is_file():
            return None, (f"--resume auto: the newest run of '{name}', {run}, has no checkpoint yet (it stopped "
                          "during its first epoch); starting a new run from scratch")
        return run / "last.pth", f"--resume auto: resuming {run}, the newest run of '{name}'"
    path = Path(resume)
    if path.is_dir():
        path = path / "last.pth"
    if not path.is_file():
        raise FileNotFoundError(f"--resume {resume}: no checkpoint at '{path}' (give a run directory, a .pth file "
                                "or 'auto')")
    return path, f"resuming from {path}"


def _resumable(key: str) -> bool:
    return any(key == allowed or (allowed.endswith(".") and key.startswith(allowed)) for allowed in RESUMABLE)


def _set(tree: dict, key: str, value: Any) -> None:
    *sections, leaf = key.split(".")
    for section in sections:
        tree = tree[section]
    tree[leaf] = value


def apply_changes(run_cfg: Config, user_cfg: Config, keys: set[str]) -> tuple[Config, dict[str, tuple[Any, Any]]]:
    """The run's config with the user's values for `keys` where they differ; refuses non-resumable keys."""
    old, new = flatten_config(run_cfg), flatten_config(user_cfg)
    wanted = {leaf for key in keys for leaf in old if leaf == key or leaf.startswith(key + ".")}
    changes = {k: (old[k], new[k]) for k in sorted(wanted) if k not in _LOCATING and old[k] != new[k]}
    refused = [k for k in changes if not _resumable(k)]
    if refused:
        key, others = refused[0], refused[1:]
        also = f" (also {', '.join(others)})" if others else ""
        allowed = ", ".join(a + "*" if a.endswith(".") else a for a in RESUMABLE)
        raise ConfigError(
            f"--resume: config key '{key}' cannot change when a run is resumed (the run has {changes[key][0]!r}, "
            f"given {changes[key][1]!r}){also}. Start a new run to change it, or resume without it. Keys that may "
            f"change on resume: {allowed}")
    tree = config_to_dict(run_cfg)
    for key, (_, value) in changes.items():
        _set(tree, key, value)
    return config_from_dict(tree), changes


def finished_reason(ckpt: dict, cfg: Config) -> Optional[str]:
    """Why the run saved in `ckpt` has nothing left to train under `cfg` (None: it can go on)."""
    epoch, old = ckpt["epoch"], config_of(ckpt)
    if epoch >= cfg.train.epochs:
        return f"all {cfg.train.epochs} epochs are done"
    stopped = ckpt.get("stopped")
    budget = cfg.train.time_budget_min
    if stopped == "time_budget" and 0 < budget <= old.train.time_budget_min:
        return f"its time budget of {budget:g} min was spent after epoch {epoch}"
    patience = cfg.train.early_stop_patience
    if stopped == "early_stop" and 0 < patience <= ckpt.get("bad_epochs", 0):
        return f"early stopping ended it after epoch {epoch} (patience {patience})"
    return None


def check_run_folder(checkpoint: Path, ckpt: dict, cfg: Config) -> None:
    """The files a resume reads beside `checkpoint` in its run folder: the split (else a new one would be drawn
    and validation images could have been trained on) and the history up to the checkpoint's epoch. Raises
    `RunFolderError` naming the file and what to do. A checkpoint outside a run folder (a copy) needs neither."""
    run = Path(checkpoint).parent
    if not any((run / name).exists() for name in ("config.yaml", "history.json", "split.json")):
        return  # a copied checkpoint: a new run with a new split
    if not (run / "split.json").is_file() and not cfg.data.split.file:
        raise RunFolderError(
            f"run folder '{run}' has no split.json, the train/validation split this run was trained with: resuming "
            "would draw a new one and validate on images it trained on; restore split.json from a backup (or pass "
            "it with --opts data.split.file=PATH), or start a new run")
    if (run / "config.yaml").is_file():
        try:
            load_config(run / "config.yaml", saved_by_a_run=True)
        except ConfigError as exc:
            reason = " ".join(str(exc).split())  # YAML parser messages span several lines
            raise RunFolderError(
                f"{run / 'config.yaml'} is not a valid config, edited by hand? ({reason}); a resume takes the run's "
                "settings from its checkpoint and writes config.yaml again: undo the edit or delete the file, and "
                "change the settings that may change with --opts") from None
    if not (run / "split.json").is_file():
        return
    read_json_file(run / "split.json", "the train/validation split", "restore it from a backup, or start a new run")
    epochs = ckpt.get("epoch", 0)
    history = read_history(run, required=epochs > 0)
    if len(history) < epochs:
        raise RunFolderError(f"{run / 'history.json'} holds {len(history)} epochs but the checkpoint {checkpoint} "
                             f"holds {epochs}: restore it from a backup or from history.csv, then resume again")


def plan_resume(checkpoint: Path, user_cfg: Optional[Config] = None, keys: Optional[set[str]] = None) -> ResumePlan:
    """Resume `checkpoint` with the user's values for `keys` (the keys their --config / --opts set)."""
    ckpt = read_checkpoint(checkpoint)
    run_cfg = config_of(ckpt, checkpoint)
    check_run_folder(Path(checkpoint), ckpt, run_cfg)
    cfg, changes = apply_changes(run_cfg, user_cfg, keys or set()) if user_cfg is not None else (run_cfg, {})
    return ResumePlan(checkpoint=Path(checkpoint), cfg=cfg, new_run=Path(checkpoint).name != "last.pth",
                      changes=changes, finished=finished_reason(ckpt, cfg))


def prepare_resume(resume: str, user_cfg: Config, config_path: Optional[str], overrides: list[str]
                   ) -> Optional[ResumePlan]:
    """`train.py --resume`: locate, explain and plan (None: start a new run). Prints what it decided."""
    checkpoint, why = locate_checkpoint(resume, user_cfg)
    print(why)
    if checkpoint is None:
        return None
    started_with = read_checkpoint(checkpoint).get("config_file")
    # The file the run was started with brings no changes (only --opts do); another file brings the keys it sets.
    same_file = config_path is None or started_with is None or Path(config_path).resolve() == Path(started_with)
    keys = override_keys(None if same_file else config_path, overrides)
    plan = plan_resume(checkpoint, user_cfg, keys)
    for key, (old, new) in plan.changes.items():
        print(f"resume: {key} changed from {old!r} to {new!r}")
    if plan.finished:
        run = checkpoint.parent
        best = f"; best: {run / 'best.pth'}" if (run / "best.pth").is_file() else ""
        print(f"nothing to resume: {run} is finished ({plan.finished}); final checkpoint: {run / 'last.pth'}{best}. "
              "Raise train.epochs (or the time budget) with --opts to train on.")
    elif plan.new_run:
        print(f"{checkpoint} is not the run's last.pth: a new run directory starts from its weights and state "
              f"(the run in {checkpoint.parent} is left as it is)")
    return plan

