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
import json
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from engine.sweep_measures import external_figures, external_is_current, measure_latencies, setting_cost
from engine.sweep_settings import Setting, check_names, expand_grid, read_runs_file
from engine.sweep_table import FIGURES, seed_summary, write_sweep_tables
from evaluation.external_sets import ExternalSet, read_external_set
from utils.cli import add_debug_flag, non_negative_int, positive_int, run_main
from utils.config import Config, ConfigError, flatten_config, load_config
from utils.runs import read_history, write_json_atomic

RESULT_FILE = "result.json"


@dataclass
class Run:
    setting: Setting
    seed: int
    cfg: Config
    folder: Path  # <out>/<setting>/seed<k>: the run directories and result.json


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


def length_settings(cfg: Config) -> dict[str, float]:
    return {"train.epochs": cfg.train.epochs, "train.time_budget_min": cfg.train.time_budget_min}


def run_state(run: Run) -> str:
    """done (skipped), resume <run dir>, retry (failed before its first checkpoint) or new."""
    result = read_result(run.folder)
    # A finished run counts as done for the length it was trained for: more epochs (or budget) trains on.
    if result is not None and result.get("status") == "done" and result.get("length_keys") == length_settings(run.cfg):
        return "done"
    last = last_checkpoint(run)
    if last is not None:
        return f"resume {last.parent.name}"
    return "retry" if result is not None else "new"


# --------------------------------------------------------------------------------------------- running
def train_and_score(run: Run, split: str, bootstrap: int, show_progress: bool,
                    external: Optional[ExternalSet] = None) -> dict:
    """Train (or resume, or skip finished training), score best.pth on `split` (and on the external set), write
    and return result.json."""
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
        "length_keys": length_settings(run.cfg),
        **{key: metrics.get(key) for key, _ in FIGURES},
        "ci95": {key: intervals.get(key) for key, _ in FIGURES},
        "epochs": len(history),
        "train_min": sum(row.get("time_s", 0.0) for row in history) / 60.0,
        "train_img_s": sum(row.get("train_img_s", 0.0) for row in history) / len(history) if history else None,
        "sweep_wall_s": time.time() - start,  # this invocation's training and scoring (a resume: its part)
    }
    if external is not None:
        result["external"] = external_figures(run_dir, external, bootstrap, show_progress)
    write_json_atomic(result, run.folder / RESULT_FILE)
    return result


def setting_rows(settings: Sequence[Setting], runs: Sequence[Run], measures: dict[str, dict]) -> list[dict]:
    """Per setting: its finished results, failed seeds, the aggregate and the model's size."""
    rows = []
    for setting in settings:
        mine = [run for run in runs if run.setting.name == setting.name]
        results = [read_result(run.folder) for run in mine]
        done = [r for r in results if r and r.get("status") == "done"]
        failed = [(run.seed, r.get("error", "")) for run, r in zip(mine, results) if r and r.get("status") == "failed"]
        rows.append({"setting": setting, "seeds": [run.seed for run in mine], "done": done, "failed": failed,
                     "summary": seed_summary(done), **measures.get(setting.name, {})})
    return rows


def run_all(runs: Sequence[Run], split: str, bootstrap: int, show_progress: bool,
            external: Optional[ExternalSet] = None) -> list[Run]:
    """Execute the runs one after another, skipping finished ones (a finished run without the external set's
    figures is scored on it); returns the runs that failed."""
    from engine.trainer import TrainingInterrupted

    failed = []
    for index, run in enumerate(runs, start=1):
        where = f"[sweep] run {index}/{len(runs)}: {run.setting.name} seed {run.seed}"
        state = run_state(run)
        if state == "done":
            result = read_result(run.folder) or {}
            if external_is_current(result, external):
                print(f"{where}: finished earlier, skipped ({run.folder / RESULT_FILE})")
                continue
            print(f"{where}: finished earlier; scoring it on {external.name} ({external.source})")
            result["external"] = external_figures(Path(result["run_dir"]), external, bootstrap, show_progress)
            write_json_atomic(result, run.folder / RESULT_FILE)
            continue
        print(f"{where} ({state}): {' '.join(run.setting.overrides) or 'the config as it is'}")
        run.folder.mkdir(parents=True, exist_ok=True)
        try:
            train_and_score(run, split, bootstrap, show_progress, external)
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
    parser.add_argument("--split", default="val", choices=["val", "dev_test", "test"],
                        help="split that scores each run: val (selection), dev_test or test (held out)")
    parser.add_argument("--bootstrap", type=non_negative_int, default=1000, metavar="N",
                        help="resamples for test.py's 95%% intervals (0: none)")
    parser.add_argument("--baseline", default=None, metavar="SETTING",
                        help="test every setting against this one, seed by seed, on the same images (paired "
                             "intervals, p-values Holm-adjusted over the sweep); default: the first setting")
    parser.add_argument("--external", type=Path, default=None, metavar="FILE.yaml",
                        help="also score every run on this external dataset (configs/external/pmram.yaml); its "
                             "balanced accuracy joins the table")
    parser.add_argument("--no-latency", action="store_true",
                        help="leave out the CPU latency columns (measured for every setting in one pass after the "
                             "runs, kept in <out>/latency.json)")
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
    if args.baseline is not None and args.baseline not in [s.name for s in settings]:
        raise ConfigError(f"--baseline {args.baseline}: no such setting (the settings: "
                          f"{', '.join(s.name for s in settings)})")
    seeds = args.seeds or [base.experiment.seed]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds repeats a seed ({' '.join(map(str, seeds))}): give each once")
    external = read_external_set(args.external) if args.external is not None else None
    runs = plan_runs(args.config, args.opts, settings, seeds, out, length_overrides(args.epochs, args.budget_min))
    measures = {s.name: setting_cost(next(r.cfg for r in runs if r.setting is s), s.name) for s in settings}

    print(f"[sweep] {len(settings)} setting(s) x {len(seeds)} seed(s) = {len(runs)} runs into {out}; "
          f"{length_label(runs[0].cfg)}; scored on the {args.split} split")
    for setting in settings:
        size = measures[setting.name]
        states = ", ".join(f"seed {r.seed}: {run_state(r)}" for r in runs if r.setting is setting)
        print(f"  {setting.name}: {' '.join(setting.overrides) or '(the config)'}  "
              f"[{size['params'] / 1e6:.3f} M params, {size['gmacs']:.3f} GMACs; {states}]")
    if args.dry_run:
        return 0
    out.mkdir(parents=True, exist_ok=True)
    from engine.trainer import TrainingInterrupted

    try:
        failed = run_all(runs, args.split, args.bootstrap, not args.no_progress, external)
    except (TrainingInterrupted, KeyboardInterrupt) as exc:
        print(f"{exc or 'interrupted'}\n[sweep] interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    if not args.no_latency:  # every setting timed in one pass, after the training, side by side
        first_runs = [next(r for r in runs if r.setting is s) for s in settings]
        timed = measure_latencies([(r.setting.name, r.cfg, r.setting.overrides) for r in first_runs], out)
        for name, figures in timed.items():
            measures[name].update(figures)
    title = f"{args.config} ({args.runs.name if args.runs else 'grid'})"
    print(write_sweep_tables(setting_rows(settings, runs, measures), out, title, args.split,
                             baseline=args.baseline or settings[0].name))
    print(f"tables: {out / 'sweep.md'}, {out / 'sweep.csv'}, {out / 'sweep.png'}")
    if failed:
        print(f"{len(failed)} of {len(runs)} runs failed (listed above and in sweep.md); rerun the command to retry "
              "them", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    from utils.allocator import keep_freed_memory

    keep_freed_memory()  # as train.py: reuse large activation buffers instead of faulting them in each batch
    sys.exit(run_main(main))
