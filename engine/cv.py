"""K-fold cross-validation of one config: train every fold, then one table of mean ± std over the folds.

    python -m engine.cv --config configs/brisc_cpu.yaml --folds 5 [--opts train.epochs=30 ...]

Fold k trains `engine.trainer.train` with `data.split.folds=K data.split.fold=k` (grouped by duplicate content and
stratified by class, see datasets/splits.py) as experiment `<name>_fold<k>`. Each fold's best.pth is scored on
its validation fold by test.py's pipeline (`evaluation.pipeline.run_test`, as `engine.sweep` scores its runs:
headline subset, native resolution; its metrics.json in the fold's run folder); the figures go into `<work_dir>/<name>_cv/<timestamp>/`: `cv_folds.csv` (one row per fold,
then the mean and the standard deviation), `cv_summary.md` (mean ± std of the headline figures) and
`cv.json`. The standard deviation is the sample one (ddof=1) over the K fold results.
"""
from __future__ import annotations

import argparse
import copy
import csv
import sys
from pathlib import Path
from typing import Optional

from evaluation.summary import HEADLINE_FIGURES
from utils.allocator import keep_freed_memory
from utils.config import Config, ConfigError, load_config
from utils.cli import add_debug_flag, int_at_least, run_main
from utils.runs import new_run_dir, point_latest, write_json_atomic
from utils.tables import markdown_table, summarise

# the figures of cv_summary.md: the headline figures, then the global and 2-class overlaps and the loss
SHOWN = (*(key for key, _ in HEADLINE_FIGURES), "dice_global", "iou_global", "dice_2class", "miou_2class", "loss")


def fold_results(run_dirs: list[Path], show_progress: bool = True) -> list[dict]:
    """Each fold's figures, scored on its validation fold by test.py's pipeline (as `engine.sweep` scores its
    runs), with its fold index and run directory."""
    from evaluation.pipeline import TestOptions, run_test
    from evaluation.summary import FIGURE_KEYS

    rows = []
    for k, run_dir in enumerate(run_dirs):
        metrics = run_test(TestOptions(checkpoint=Path(run_dir) / "best.pth", split="val", bootstrap=0,
                                       show_progress=show_progress))
        figures = {key: float(metrics[key]) for key in FIGURE_KEYS if isinstance(metrics.get(key), (int, float))}
        rows.append({"fold": k, "run_dir": str(run_dir), **figures})
    return rows


def write_cv_tables(rows: list[dict], out_dir: Path, title: str) -> dict[str, tuple[float, float]]:
    """`cv_folds.csv`, `cv_summary.md` and `cv.json` in `out_dir`; returns the summary."""
    summary = summarise(rows)
    keys = list(summary)
    with open(out_dir / "cv_folds.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["fold", *keys, "run_dir"])
        for row in rows:
            writer.writerow([row["fold"], *(f"{row[k]:.6g}" for k in keys), row["run_dir"]])
        writer.writerow(["mean", *(f"{summary[k][0]:.6g}" for k in keys), ""])
        writer.writerow(["std", *(f"{summary[k][1]:.6g}" for k in keys), ""])
    shown = [k for k in SHOWN if k in summary] or keys
    percent = {k for k in shown if k != "loss"}
    cells = []
    for k in shown:
        scale, unit = (100.0, " %") if k in percent else (1.0, "")
        mean, std = summary[k]
        cells.append([f"{k}{unit}", f"{mean * scale:.2f} ± {std * scale:.2f}", *(f"{r[k] * scale:.2f}" for r in rows)])
    table = markdown_table(["figure", "mean ± std", *(f"fold {r['fold']}" for r in rows)], cells)
    (out_dir / "cv_summary.md").write_text(f"# {title}: {len(rows)}-fold cross-validation (validation folds scored "
                                           f"by test.py, mean ± sample std over folds)\n\n{table}\n",
                                           encoding="utf-8")
    write_json_atomic({"folds": rows, "summary": {k: {"mean": m, "std": s} for k, (m, s) in summary.items()}},
                      out_dir / "cv.json")
    return summary


def run_cv(cfg: Config, folds: Optional[int] = None, show_progress: bool = True) -> Path:
    """Train every fold of `cfg` and write the tables; returns their directory."""
    k_folds = folds or cfg.data.split.folds
    if k_folds < 2:
        raise ConfigError(f"cross-validation needs --folds K or data.split.folds >= 2 (got {k_folds})")
    from .trainer import train  # heavy imports only once the arguments are known to be valid

    run_dirs = []
    for k in range(k_folds):
        fold_cfg = copy.deepcopy(cfg)
        fold_cfg.data.split.folds, fold_cfg.data.split.fold = k_folds, k
        fold_cfg.experiment.name = f"{cfg.experiment.name}_fold{k}"
        print(f"[cv] fold {k + 1}/{k_folds}: experiment {fold_cfg.experiment.name}")
        run_dirs.append(train(fold_cfg, show_progress=show_progress))
    out_dir = new_run_dir(cfg.experiment.work_dir, f"{cfg.experiment.name}_cv")
    write_cv_tables(fold_results(run_dirs, show_progress), out_dir, cfg.experiment.name)
    point_latest(out_dir)
    return out_dir


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="K-fold cross-validation of one experiment config.")
    parser.add_argument("--config", required=True, help="YAML experiment file (see configs/)")
    parser.add_argument("--folds", type=int_at_least(2), default=None,
                        help="number of folds (default: data.split.folds)")
    parser.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.opts)
    out_dir = run_cv(cfg, args.folds, show_progress=not args.no_progress)
    print((out_dir / "cv_summary.md").read_text(encoding="utf-8"))
    print(f"tables: {out_dir / 'cv_summary.md'}, {out_dir / 'cv_folds.csv'}")
    return 0


if __name__ == "__main__":
    # CPU: large activations are reused instead of faulted in afresh at every batch (see utils/allocator.py)
    keep_freed_memory()
    sys.exit(run_main(main))
