"""A sweep: train one config under several settings and seeds, score each run, and write one table.

    python -m engine.sweep --config configs/demo.yaml --grid 'model.kwargs.ham_rank=8,16,32' 'loss.seg.focal=0,0.5' \
        --seeds 0 1 2 --epochs 10
    python -m engine.sweep --config configs/brisc_cpu.yaml --runs configs/ablation.yaml --seeds 0 1 2 --epochs 30

Settings come from `--grid KEY=V1,V2,...` (the cartesian product over the keys; values are YAML, as in
`--opts`; commas inside [...] or {...} do not split) or from `--runs FILE.yaml`, a mapping of named runs, each a
mapping of dotted config keys to values (see configs/ablation.yaml). Every setting runs once per seed
(`experiment.seed`), one run after another, through the normal machinery: `engine.trainer.train`, then
`evaluation.pipeline.run_test` on the run's best.pth (the validation split by default). Run k of setting S trains in
`<out>/<S>/seed<k>/<timestamp>/` and records `<out>/<S>/seed<k>/result.json`.

Every config is loaded and validated, and every model built (which checks `model.kwargs`), before the first run
trains. A run that fails is recorded (`status: failed`, with the error) and the sweep goes on; the exit status is
1 if any run failed. Running the same command again skips the finished runs, resumes a half-finished one from its
`last.pth` (continuing the same run directory, as `train.py --resume`), and retries the failed ones.

Results: `<out>/sweep.md` and `<out>/sweep.csv` (one row per setting: mean ± sample std over the finished seeds
of the headline figures of `metrics.json`, with the 95 % bootstrap interval when a setting has one seed; params,
GMACs, training speed, epochs, training wall-clock) and `<out>/sweep.png`.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import re
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from engine.cv import summarise
from utils.cli import add_debug_flag, non_negative_int, positive_int, run_main
from utils.config import Config, ConfigError, flatten_config, load_config, parse_override
from utils.runs import read_history, write_json_atomic

RESULT_FILE = "result.json"
# Headline figures of metrics.json in the table (fractions shown as %, HD95 in pixels at native size).
FIGURES = (("accuracy", "accuracy %"), ("f1_macro", "macro-F1 %"), ("dice", "Dice %"), ("hd95", "HD95 px"))
# Per-run figures of training, averaged over seeds like the scores.
TRAINING = ("train_img_s", "epochs", "train_min")
# Keys the sweep sets itself for every run: where it trains and with which seed.
SWEEP_KEYS = ("experiment.name", "experiment.work_dir", "experiment.seed")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=+-]*")


@dataclass
class Setting:
    """One row of the table: a name and the `key=value` overrides it applies to the base config."""

    name: str
    overrides: list[str]


@dataclass
class Run:
    setting: Setting
    seed: int
    cfg: Config
    folder: Path  # <out>/<setting>/seed<k>: the run directories and result.json


# --------------------------------------------------------------------------------------------- settings
def split_values(text: str) -> list[str]:
    """`8,16,32` -> ['8', '16', '32']; commas inside brackets, braces or quotes do not split (`[0.4,0.2],[]`)."""
    parts, depth, quote, current = [], 0, "", ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
            continue
        current += char
    parts.append(current.strip())
    return parts


def override_text(key: str, value: Any) -> str:
    """`key=value` with the value written so that `--opts` parsing (YAML) reads it back unchanged."""
    dumped = yaml.safe_dump(value, default_flow_style=True, width=float("inf")).strip()
    return f"{key}={dumped.removesuffix('...').strip()}"


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]", "-", text).strip("-") or "value"


def expand_grid(specs: Sequence[str]) -> list[Setting]:
    """The cartesian product of `KEY=V1,V2,...` specs, one setting per combination, named `leaf=value_...`."""
    if not specs:
        raise ConfigError("--grid is empty: give at least one KEY=V1,V2,... (e.g. model.kwargs.ham_rank=8,16,32)")
    keys, values = [], []
    for spec in specs:
        if "=" not in spec or not spec.split("=", 1)[0].strip():
            raise ConfigError(f"--grid '{spec}' must look like section.key=value1,value2,...")
        key, raw = (part.strip() for part in spec.split("=", 1))
        if key in keys:
            raise ConfigError(f"--grid names '{key}' twice: give all its values in one KEY=V1,V2,... entry")
        options = split_values(raw)
        if any(not option for option in options):
            raise ConfigError(f"--grid '{spec}' has an empty value: separate values with single commas")
        for option in options:
            parse_override(f"{key}={option}")  # the same parsing as --opts (errors name the entry)
        keys.append(key)
        values.append(options)
    leaves = [key.rsplit(".", 1)[-1] for key in keys]
    labels = [leaf if leaves.count(leaf) == 1 else key for leaf, key in zip(leaves, keys)]
    settings = []
    for combo in itertools.product(*values):
        name = "_".join(_safe_name(f"{label}={value}") for label, value in zip(labels, combo))
        settings.append(Setting(name, [f"{key}={value}" for key, value in zip(keys, combo)]))
    return settings


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a mapping with the same key twice (PyYAML would keep the last one silently)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"'{key}' appears twice in one mapping (line {key_node.start_mark.line + 1}): names and "
                              "keys must be unique")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_runs_file(path: Path) -> list[Setting]:
    """Settings from a YAML file: `runs: {name: {dotted.key: value, ...}, ...}` (an empty mapping: the config)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"runs file '{path}' does not exist")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except ConfigError as exc:
        raise ConfigError(f"runs file '{path}': {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"runs file '{path}' is not valid YAML: {exc}") from None
    runs = raw.get("runs") if isinstance(raw, dict) else None
    if not isinstance(runs, dict) or not runs:
        raise ConfigError(f"runs file '{path}' must hold a non-empty mapping 'runs:' of run names to overrides "
                          "(e.g. runs: {baseline: {}, no_context: {model.kwargs.context: none}})")
    settings = []
    for name, overrides in runs.items():
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise ConfigError(f"runs file '{path}': run name {name!r} must use letters, digits, '_', '.', '=', '+' "
                              "or '-' (it names a folder)")
        if overrides is None:
            overrides = {}
        if not isinstance(overrides, dict):
            raise ConfigError(f"runs file '{path}': run '{name}' must be a mapping of dotted config keys to values, "
                              f"got {overrides!r}")
        settings.append(Setting(name, [override_text(str(key), value) for key, value in overrides.items()]))
    return settings


def check_names(settings: Sequence[Setting]) -> None:
    """Refuse two settings of the same name (they would share folders) and settings that set the sweep's keys."""
    seen: dict[str, Setting] = {}
    for setting in settings:
        if setting.name in seen:
            first, second = (" ".join(s.overrides) or "the config" for s in (seen[setting.name], setting))
            raise ConfigError(f"two runs are named '{setting.name}' ({first}; {second}): give every run its own name")
        seen[setting.name] = setting
        for text in setting.overrides:
            key = text.split("=", 1)[0].strip()
            if key in SWEEP_KEYS:
                raise ConfigError(f"run '{setting.name}' sets '{key}', which the sweep sets for every run (seeds: "
                                  "--seeds; folders: --out)")


# --------------------------------------------------------------------------------------------- planning
def length_overrides(epochs: Optional[int], budget_min: Optional[float]) -> list[str]:
    """A fixed number of epochs without a time budget, or a time budget (train.epochs is then the cap)."""
    if epochs is not None:
        return [f"train.epochs={epochs}", "train.time_budget_min=0"]
    if budget_min is not None:
        return [f"train.time_budget_min={budget_min}"]
    return []


def length_label(cfg: Config) -> str:
    if cfg.train.time_budget_min > 0:
        return (f"a time budget of {cfg.train.time_budget_min:g} min per run (at most {cfg.train.epochs} epochs; "
                "the epochs column says how many fit)")
    epochs = cfg.train.epochs
    return f"a fixed length of {epochs} epoch{'s' if epochs != 1 else ''} per run (no time budget)"


def plan_runs(config: Path, opts: Sequence[str], settings: Sequence[Setting], seeds: Sequence[int], out: Path,
              length: Sequence[str] = ()) -> list[Run]:
    """Every (setting, seed) with its validated config; errors name the run and the key."""
    from model import check_model_kwargs, check_model_name

    check_names(settings)
    runs = []
    for setting in settings:
        for seed in seeds:
            overrides = [*length, *opts, *setting.overrides, f"experiment.seed={seed}",
                         f"experiment.work_dir={out / setting.name}", f"experiment.name=seed{seed}"]
            try:
                cfg = load_config(config, overrides)
                check_model_name(cfg.model.name)
                check_model_kwargs(cfg.model.name, cfg.model.kwargs)
            except ConfigError as exc:
                raise ConfigError(f"run '{setting.name}': {exc}") from None
            runs.append(Run(setting, seed, cfg, out / setting.name / f"seed{seed}"))
    return runs


def measure(cfg: Config, name: str) -> dict[str, float]:
    """Parameters and thop GMACs (batch 1, eval mode, at data.image_size) of a setting's model; building it
    checks the values of `model.kwargs`."""
    import torch

    from model import build_model
    from model.loading import model_kwargs
    from utils.flops import count_parameters, thop_macs

    try:
        model = build_model(cfg.model.name, **model_kwargs(cfg, pretrained=False)).eval()
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"run '{name}': model '{cfg.model.name}' cannot be built from model.kwargs "
                          f"{cfg.model.kwargs}: {exc}") from None
    x = torch.zeros(1, cfg.data.in_channels, cfg.data.image_size, cfg.data.image_size)
    return {"params": count_parameters(model), "gmacs": thop_macs(model, x) / 1e9}


def read_result(folder: Path) -> Optional[dict]:
    path = folder / RESULT_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None  # a torn file: run again


def last_checkpoint(run: Run) -> Optional[Path]:
    """The newest run directory's last.pth under the run's folder (None: start a new run)."""
    from engine.resume import newest_run

    newest = newest_run(run.folder.parent, run.folder.name)
    return newest / "last.pth" if newest is not None and (newest / "last.pth").is_file() else None


def length_of(cfg: Config) -> dict[str, float]:
    return {"train.epochs": cfg.train.epochs, "train.time_budget_min": cfg.train.time_budget_min}


def status(run: Run) -> str:
    """done (skipped), resume <run dir>, retry (failed before its first checkpoint) or new."""
    result = read_result(run.folder)
    # A finished run counts as done for the length it was trained for: more epochs (or budget) trains on.
    if result is not None and result.get("status") == "done" and result.get("length_keys") == length_of(run.cfg):
        return "done"
    last = last_checkpoint(run)
    if last is not None:
        return f"resume {last.parent.name}"
    return "retry" if result is not None else "new"


# --------------------------------------------------------------------------------------------- running
def execute(run: Run, split: str, bootstrap: int, show_progress: bool) -> dict:
    """Train (or resume, or skip finished training), score best.pth on `split`, write and return result.json."""
    from engine.resume import plan_resume
    from engine.trainer import train
    from evaluation.conventions import setting_of
    from evaluation.pipeline import TestOptions, run_test

    start = time.time()
    last = last_checkpoint(run)
    if last is None:
        run_dir = train(run.cfg, show_progress=show_progress)
    else:
        # Every key is compared with the run's own config: only those train.py --resume accepts may differ.
        try:
            plan = plan_resume(last, run.cfg, set(flatten_config(run.cfg)))
        except ConfigError as exc:
            raise ConfigError(f"{run.folder} holds a run of another config ({exc}); delete that folder or "
                              "sweep into another --out") from None
        if plan.finished:
            print(f"[sweep] {last.parent}: training finished ({plan.finished}); scoring it")
            run_dir = last.parent
        else:
            print(f"[sweep] resuming {last.parent} after its last finished epoch")
            run_dir = train(run.cfg, plan, show_progress=show_progress)
    metrics = run_test(TestOptions(checkpoint=run_dir / "best.pth", split=split, bootstrap=bootstrap,
                                   show_progress=show_progress))
    history = read_history(run_dir)
    intervals = metrics.get("ci95") or {}
    result = {
        "status": "done", "setting": run.setting.name, "seed": run.seed, "overrides": run.setting.overrides,
        "run_dir": str(run_dir), "scored": setting_of(metrics), "length": length_label(run.cfg),
        "length_keys": length_of(run.cfg),
        **{key: metrics.get(key) for key, _ in FIGURES},
        "ci95": {key: intervals.get(key) for key, _ in FIGURES},
        "epochs": len(history),
        "train_min": sum(row.get("time_s", 0.0) for row in history) / 60.0,
        "train_img_s": sum(row.get("train_img_s", 0.0) for row in history) / len(history) if history else None,
        "sweep_wall_s": time.time() - start,  # this invocation's training and scoring (a resume: its part)
    }
    write_json_atomic(result, run.folder / RESULT_FILE)
    return result


def run_all(runs: Sequence[Run], split: str, bootstrap: int, show_progress: bool) -> list[Run]:
    """Execute the runs one after another, skipping finished ones; returns the runs that failed."""
    from engine.trainer import TrainingInterrupted

    failed = []
    for index, run in enumerate(runs, start=1):
        where = f"[sweep] run {index}/{len(runs)}: {run.setting.name} seed {run.seed}"
        state = status(run)
        if state == "done":
            print(f"{where}: finished earlier, skipped ({run.folder / RESULT_FILE})")
            continue
        print(f"{where} ({state}): {' '.join(run.setting.overrides) or 'the config as it is'}")
        run.folder.mkdir(parents=True, exist_ok=True)
        try:
            execute(run, split, bootstrap, show_progress)
        except (TrainingInterrupted, KeyboardInterrupt):
            raise  # Ctrl-C ends the sweep; rerunning the command resumes this run
        except Exception as exc:  # noqa: BLE001 - one failed run is recorded and the sweep goes on
            message = f"{type(exc).__name__}: {exc}"
            write_json_atomic({"status": "failed", "setting": run.setting.name, "seed": run.seed,
                               "overrides": run.setting.overrides, "error": message,
                               "traceback": traceback.format_exc()}, run.folder / RESULT_FILE)
            print(f"{where} FAILED: {message} (recorded in {run.folder / RESULT_FILE}; the sweep goes on)",
                  file=sys.stderr)
            failed.append(run)
    return failed


# --------------------------------------------------------------------------------------------- tables
def aggregate(results: Sequence[dict]) -> dict[str, tuple[float, float]]:
    """{figure: (mean, sample std)} over the finished seeds of one setting (a figure missing in a seed is left out)."""
    numeric = [{"run_dir": r.get("run_dir", ""),
                **{k: float(r[k]) for k in (*(key for key, _ in FIGURES), *TRAINING)
                   if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)}} for r in results]
    return summarise(numeric) if numeric else {}


def _cell(key: str, summary: dict, results: Sequence[dict]) -> str:
    """`mean ± std` over seeds; one seed: its value with its bootstrap interval; nothing: `–`."""
    if key not in summary:
        return "–"
    scale = 1.0 if key == "hd95" else 100.0
    mean, std = summary[key]
    if len(results) > 1:
        return f"{mean * scale:.2f} ± {std * scale:.2f}"
    interval = (results[0].get("ci95") or {}).get(key)
    return f"{mean * scale:.2f}" + (f" [{interval[0] * scale:.2f}, {interval[1] * scale:.2f}]" if interval else "")


def setting_rows(settings: Sequence[Setting], runs: Sequence[Run], measures: dict[str, dict]) -> list[dict]:
    """Per setting: its finished results, failed seeds, the aggregate and the model's size."""
    rows = []
    for setting in settings:
        mine = [run for run in runs if run.setting.name == setting.name]
        results = [read_result(run.folder) for run in mine]
        done = [r for r in results if r and r.get("status") == "done"]
        failed = [(run.seed, r.get("error", "")) for run, r in zip(mine, results) if r and r.get("status") == "failed"]
        rows.append({"setting": setting, "seeds": [run.seed for run in mine], "done": done, "failed": failed,
                     "summary": aggregate(done), **measures.get(setting.name, {})})
    return rows


def header_line(rows: Sequence[dict], split: str) -> str:
    """What the figures measure, from the metrics.json settings of the finished runs."""
    from evaluation.conventions import setting_label

    labels = sorted({setting_label(r["scored"]) for row in rows for r in row["done"] if r.get("scored")})
    lengths = sorted({r["length"] for row in rows for r in row["done"] if r.get("length")})
    scored = "; ".join(labels) if labels else f"{split} split (no run finished)"
    mixed = " (runs differ: not comparable)" if len(labels) > 1 else ""
    return (f"Scored on: {scored}{mixed} (split, headline subset, segmentation resolution, mask threshold, TTA). "
            f"Training: {'; '.join(lengths) or 'no run finished'}.")


def render_markdown(rows: Sequence[dict], title: str, split: str) -> str:
    header = ["setting", "overrides", "seeds", *(label for _, label in FIGURES), "params (M)", "GMACs",
              "train img/s", "epochs", "train wall (min)"]
    lines = [f"# Sweep: {title}", "", header_line(rows, split), "",
             "Cells: mean ± sample standard deviation over the seeds that finished; with one seed, its value and "
             "the 95 % bootstrap interval of test.py (per-image resampling). Dice: per image, mean over the images "
             "with a tumour; HD95: pixels at each image's own size. GMACs: thop, batch 1, at the training image "
             "size.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        summary, done = row["summary"], row["done"]
        seeds = f"{len(done)}/{len(row['seeds'])}"
        overrides = ", ".join(f"`{o}`" for o in row["setting"].overrides) or "(config)"
        cells = [row["setting"].name, overrides, seeds, *(_cell(key, summary, done) for key, _ in FIGURES),
                 f"{row['params'] / 1e6:.3f}" if "params" in row else "–",
                 f"{row['gmacs']:.3f}" if "gmacs" in row else "–",
                 f"{summary['train_img_s'][0]:.1f}" if "train_img_s" in summary else "–",
                 f"{summary['epochs'][0]:g}" if "epochs" in summary else "–",
                 f"{summary['train_min'][0]:.2f}" if "train_min" in summary else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    failures = [(row["setting"].name, seed, error) for row in rows for seed, error in row["failed"]]
    if failures:
        lines += ["", "Failed runs (rerun the command to retry them):", ""]
        lines += [f"- {name} seed {seed}: {error}" for name, seed, error in failures]
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[dict], path: Path) -> None:
    figures = [key for key, _ in FIGURES]
    columns = ["setting", "overrides", "seeds_planned", "seeds_done", "seeds_failed"]
    columns += [f"{key}_{part}" for key in figures for part in ("mean", "std", "ci_low", "ci_high")]
    columns += ["params", "gmacs", *(f"{key}_mean" for key in TRAINING), "split", "subset", "resolution",
                "threshold", "length"]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            summary, done = row["summary"], row["done"]
            scored = done[0]["scored"] if done else {}
            values: list[Any] = [row["setting"].name, " ".join(row["setting"].overrides), len(row["seeds"]),
                                 len(done), len(row["failed"])]
            for key in figures:
                mean, std = summary.get(key, (None, None))
                interval = (done[0].get("ci95") or {}).get(key) if len(done) == 1 else None
                values += [mean, std if len(done) > 1 else None, *(interval or (None, None))]
            values += [row.get("params"), row.get("gmacs"), *(summary.get(k, (None,))[0] for k in TRAINING),
                       scored.get("split"), scored.get("subset"), scored.get("resolution"), scored.get("threshold"),
                       done[0]["length"] if done else None]
            writer.writerow(["" if v is None else f"{v:.6g}" if isinstance(v, float) else v for v in values])


def write_tables(rows: Sequence[dict], out: Path, title: str, split: str) -> str:
    """sweep.md, sweep.csv and sweep.png in `out`; returns the markdown."""
    from visualization.sweep import save_sweep_figure

    out.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(rows, title, split)
    (out / "sweep.md").write_text(markdown, encoding="utf-8")
    write_csv(rows, out / "sweep.csv")
    points = [{"name": row["setting"].name, **{k: row["summary"][k] for k in ("accuracy", "dice")
                                                if k in row["summary"]}} for row in rows]
    save_sweep_figure(points, out / "sweep.png", f"{title} ({split} split; mean ± std over seeds)")
    return markdown


# --------------------------------------------------------------------------------------------- command line
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path, help="the base YAML experiment file")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--grid", nargs="+", metavar="KEY=V1,V2", help="keys to sweep; every combination runs")
    what.add_argument("--runs", type=Path, metavar="FILE.yaml", help="named runs, each a mapping of overrides")
    parser.add_argument("--seeds", nargs="+", type=non_negative_int, default=None,
                        help="experiment.seed of each repetition (default: the config's seed)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=positive_int, default=None,
                        help="train every run for N epochs (sets train.epochs, and train.time_budget_min=0)")
    length.add_argument("--budget-min", type=float, default=None, metavar="M",
                        help="give every run a wall-clock budget of M minutes (train.time_budget_min)")
    parser.add_argument("--out", type=Path, default=None,
                        help="sweep folder (default: <experiment.work_dir>/<experiment.name>_sweep)")
    parser.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    parser.add_argument("--split", default="val", choices=["val", "test"], help="split that scores each run")
    parser.add_argument("--bootstrap", type=non_negative_int, default=1000, metavar="N",
                        help="resamples for test.py's 95%% intervals (0: none)")
    parser.add_argument("--dry-run", action="store_true", help="print the planned runs and exit")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    add_debug_flag(parser)
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.budget_min is not None and args.budget_min <= 0:
        raise ConfigError(f"--budget-min must be > 0 minutes, got {args.budget_min}")
    base = load_config(args.config, args.opts)
    out = args.out or Path(base.experiment.work_dir) / f"{base.experiment.name}_sweep"
    settings = expand_grid(args.grid) if args.grid is not None else read_runs_file(args.runs)
    seeds = args.seeds or [base.experiment.seed]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds repeats a seed ({' '.join(map(str, seeds))}): give each once")
    runs = plan_runs(args.config, args.opts, settings, seeds, out, length_overrides(args.epochs, args.budget_min))
    measures = {s.name: measure(next(r.cfg for r in runs if r.setting is s), s.name) for s in settings}

    print(f"[sweep] {len(settings)} setting(s) x {len(seeds)} seed(s) = {len(runs)} runs into {out}; "
          f"{length_label(runs[0].cfg)}; scored on the {args.split} split")
    for setting in settings:
        size = measures[setting.name]
        states = ", ".join(f"seed {r.seed}: {status(r)}" for r in runs if r.setting is setting)
        print(f"  {setting.name}: {' '.join(setting.overrides) or '(the config)'}  "
              f"[{size['params'] / 1e6:.3f} M params, {size['gmacs']:.3f} GMACs; {states}]")
    if args.dry_run:
        return 0
    out.mkdir(parents=True, exist_ok=True)
    from engine.trainer import TrainingInterrupted

    try:
        failed = run_all(runs, args.split, args.bootstrap, show_progress=not args.no_progress)
    except (TrainingInterrupted, KeyboardInterrupt) as exc:
        print(f"{exc or 'interrupted'}\n[sweep] interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    title = f"{args.config} ({args.runs.name if args.runs else 'grid'})"
    print(write_tables(setting_rows(settings, runs, measures), out, title, args.split))
    print(f"tables: {out / 'sweep.md'}, {out / 'sweep.csv'}, {out / 'sweep.png'}")
    if failed:
        print(f"{len(failed)} of {len(runs)} runs failed (listed above and in sweep.md); rerun the command to retry "
              "them", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    from utils.allocator import keep_freed_memory

    keep_freed_memory()  # as train.py: reuse large activation buffers instead of faulting them in each batch
    sys.exit(run_main(main))
