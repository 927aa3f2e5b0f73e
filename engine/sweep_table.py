"""The tables of a sweep (`engine.sweep`): sweep.md, sweep.csv and sweep.png, one row per setting with the mean ±
sample std over its finished seeds (one seed: its value and test.py's 95 % bootstrap interval)."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Optional, Sequence

from evaluation.summary import HEADLINE_FIGURES
from utils.tables import markdown_table, summarise

# the figures of a sweep's table: the headline figures (percent) and the boundary distance
FIGURES = (*((key, f"{label} %") for key, label in HEADLINE_FIGURES), ("hd95", "HD95 px"))
TRAINING = ("train_img_s", "epochs", "train_min")


EXTERNAL = "external_balanced_accuracy"  # the external set's headline (engine.sweep --external)
LATENCY = (("latency_b1_ms", "CPU ms/img b1", 2), ("img_s_b8", "CPU img/s b8", 1))


def flat_figures(result: dict) -> dict[str, float]:
    """The numeric figures of one run's result.json, the external set's balanced accuracy included."""
    figures = {k: result.get(k) for k in (*(key for key, _ in FIGURES), *TRAINING)}
    figures[EXTERNAL] = (result.get("external") or {}).get("balanced_accuracy")
    return {k: float(v) for k, v in figures.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_interval(key: str, result: dict) -> Optional[list]:
    if key == EXTERNAL:
        return ((result.get("external") or {}).get("ci95") or {}).get("balanced_accuracy")
    return (result.get("ci95") or {}).get(key)


def seed_summary(results: Sequence[dict]) -> dict[str, tuple[float, float]]:
    """{figure: (mean, sample std)} over the finished seeds of one setting (a figure missing in a seed is left out)."""
    numeric = [{"run_dir": r.get("run_dir", ""), **flat_figures(r)} for r in results]
    return summarise(numeric) if numeric else {}


def format_cell(key: str, summary: dict, results: Sequence[dict]) -> str:
    """`mean ± std` over seeds; one seed: its value with its 95 % interval; nothing: `–`."""
    if key not in summary:
        return "–"
    scale = 1.0 if key == "hd95" else 100.0
    mean, std = summary[key]
    if len(results) > 1:
        return f"{mean * scale:.2f} ± {std * scale:.2f}"
    interval = run_interval(key, results[0])
    return f"{mean * scale:.2f}" + (f" [{interval[0] * scale:.2f}, {interval[1] * scale:.2f}]" if interval else "")


def external_name(rows: Sequence[dict]) -> str:
    """The external set the runs were scored on ('' when none)."""
    names = {(r.get("external") or {}).get("name") for row in rows for r in row["done"]} - {None}
    return ", ".join(sorted(names))


def header_line(rows: Sequence[dict], split: str) -> str:
    """What the figures measure, from the metrics.json settings of the finished runs."""
    from evaluation.conventions import setting_label

    scored_runs = [r["scored"] for row in rows for r in row["done"] if r.get("scored")]
    thresholds = [s["threshold"] for s in scored_runs if s.get("threshold") is not None]
    # a run without masks (classification only) has no threshold: it is labelled with the others' threshold
    fallback = thresholds[0] if thresholds else None
    labels = sorted({setting_label({**s, "threshold": s["threshold"] if s.get("threshold") is not None else fallback})
                     for s in scored_runs})
    lengths = sorted({r["length"] for row in rows for r in row["done"] if r.get("length")})
    scored = "; ".join(labels) if labels else f"{split} split (no run finished)"
    mixed = " (runs differ: not comparable)" if len(labels) > 1 else ""
    if thresholds and len(thresholds) < len(scored_runs):
        scored += " (classification-only runs: no mask threshold)"
    return (f"Scored on: {scored}{mixed} (split, headline subset, segmentation resolution, mask threshold, TTA). "
            f"Training: {'; '.join(lengths) or 'no run finished'}.")


def render_markdown(rows: Sequence[dict], title: str, split: str) -> str:
    external = external_name(rows)
    timed = any("latency_b1_ms" in row for row in rows)
    header = ["setting", "overrides", "seeds", *(label for _, label in FIGURES),
              *([f"{external} balanced acc %"] if external else []), "params (M)", "GMACs",
              *([label for _, label, _ in LATENCY] if timed else []), "train img/s", "epochs", "train wall (min)"]
    lines = [f"# Sweep: {title}", "", header_line(rows, split), "",
             "Cells: mean ± sample standard deviation over the seeds that finished; with one seed, its value and "
             "the 95 % bootstrap interval of test.py (per-image resampling). Dice: per image, mean over the images "
             "with a tumour; HD95: pixels at each image's own size. GMACs: thop, batch 1, at the training image "
             "size." + (f" {external}: the external set's leak-free images (held out, another source), balanced "
                        "accuracy with its 95 % interval over scan groups (engine.sweep --external)." if external else "")
             + (" CPU ms/img b1 and img/s b8: eager PyTorch fp32 forward passes, random weights, at the training "
                "size, every setting timed one after another in one pass after the runs (latency.json)."
                if timed else ""), ""]
    cells_of = []
    for row in rows:
        summary, done = row["summary"], row["done"]
        seeds = f"{len(done)}/{len(row['seeds'])}"
        overrides = ", ".join(f"`{o}`" for o in row["setting"].overrides) or "(config)"
        cells = [row["setting"].name, overrides, seeds, *(format_cell(key, summary, done) for key, _ in FIGURES),
                 *([format_cell(EXTERNAL, summary, done)] if external else []),
                 f"{row['params'] / 1e6:.3f}" if "params" in row else "–",
                 f"{row['gmacs']:.3f}" if "gmacs" in row else "–",
                 *([f"{row[key]:.{digits}f}" if key in row else "–" for key, _, digits in LATENCY] if timed else []),
                 f"{summary['train_img_s'][0]:.1f}" if "train_img_s" in summary else "–",
                 f"{summary['epochs'][0]:g}" if "epochs" in summary else "–",
                 f"{summary['train_min'][0]:.2f}" if "train_min" in summary else "–"]
        cells_of.append(cells)
    lines.append(markdown_table(header, cells_of))
    failures = [(row["setting"].name, seed, error) for row in rows for seed, error in row["failed"]]
    if failures:
        lines += ["", "Failed runs (rerun the command to retry them):", ""]
        lines += [f"- {name} seed {seed}: {error}" for name, seed, error in failures]
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[dict], path: Path) -> None:
    figures = [key for key, _ in FIGURES]
    columns = ["setting", "overrides", "seeds_planned", "seeds_done", "seeds_failed"]
    columns += [f"{key}_{part}" for key in figures for part in ("mean", "std", "ci_low", "ci_high")]
    columns += [f"{EXTERNAL}_{part}" for part in ("mean", "std", "ci_low", "ci_high")]
    columns += ["params", "gmacs", *(key for key, _, _ in LATENCY), *(f"{key}_mean" for key in TRAINING), "split",
                "subset", "resolution", "threshold", "length"]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            summary, done = row["summary"], row["done"]
            scored = done[0]["scored"] if done else {}
            values: list[Any] = [row["setting"].name, " ".join(row["setting"].overrides), len(row["seeds"]),
                                 len(done), len(row["failed"])]
            for key in [*figures, EXTERNAL]:
                mean, std = summary.get(key, (None, None))
                interval = run_interval(key, done[0]) if len(done) == 1 else None
                values += [mean, std if len(done) > 1 else None, *(interval or (None, None))]
            values += [row.get("params"), row.get("gmacs"), *(row.get(key) for key, _, _ in LATENCY),
                       *(summary.get(k, (None,))[0] for k in TRAINING),
                       scored.get("split"), scored.get("subset"), scored.get("resolution"), scored.get("threshold"),
                       done[0]["length"] if done else None]
            writer.writerow(["" if v is None else f"{v:.6g}" if isinstance(v, float) else v for v in values])


PAIRED = ("accuracy", "dice")  # the figures tested against the baseline: McNemar / Wilcoxon (or scan sign-flip)


def paired_against(rows: Sequence[dict], baseline: str, split: str, subset: str = "leak_free",
                   resamples: int = 1000) -> list[dict]:
    """Each setting against `baseline` seed by seed (same seed, same images): the difference of each figure of
    `PAIRED` with its paired 95 % interval and p-value (`evaluation.compare`), and the p-value Holm-adjusted
    over every test of the sweep (one family: settings x seeds x figures)."""
    from evaluation.compare import compare, locate
    from evaluation.stats import holm

    base = next((row for row in rows if row["setting"].name == baseline), None)
    if base is None:
        return []
    base_runs = {r["seed"]: r for r in base["done"]}
    tests = []
    for row in rows:
        if row is base:
            continue
        for result in row["done"]:
            other = base_runs.get(result["seed"])
            if other is None:
                continue
            folders = [locate(Path(other["run_dir"]), split), locate(Path(result["run_dir"]), split)]
            compared = compare(folders, subset, resamples=resamples, seed=result["seed"])
            for key in PAIRED:
                figure = compared["figures"].get(key)
                if figure and figure.get("p_value") is not None:
                    tests.append({"setting": row["setting"].name, "seed": result["seed"], "figure": key,
                                  "difference": figure["difference"], "interval": figure.get("ci95"),
                                  "p_value": figure["p_value"], "test": figure.get("test"),
                                  "num_images": compared["num_images"], "num_groups": compared["num_groups"]})
    for test, adjusted in zip(tests, holm([t["p_value"] for t in tests])):
        test["p_holm"] = adjusted
    return tests


def render_paired(tests: Sequence[dict], baseline: str) -> str:
    """The paired table: one row per setting and seed, difference [interval] and p (Holm) per figure."""
    if not tests:
        return ""
    by_row: dict[tuple, dict] = {}
    for t in tests:
        by_row.setdefault((t["setting"], t["seed"]), {})[t["figure"]] = t
    header = ["setting", "seed", *(f"Δ {key} % [95 % interval]" for key in PAIRED),
              *(f"p {key} (Holm)" for key in PAIRED)]
    cells = []
    for (name, seed), figures in by_row.items():
        diffs, ps = [], []
        for key in PAIRED:
            t = figures.get(key)
            if t is None:
                diffs.append("–")
                ps.append("–")
                continue
            interval = t.get("interval")
            diffs.append(f"{100 * t['difference']:+.2f}" + (f" [{100 * interval[0]:+.2f}, {100 * interval[1]:+.2f}]"
                                                           if interval else ""))
            ps.append(f"{t['p_value']:.3g} ({t['p_holm']:.3g})")
        cells.append([name, str(seed), *diffs, *ps])
    first = tests[0]
    return "\n".join(["", f"## Paired against `{baseline}`", "",
                      f"Each run against the baseline run of the same seed on the same {first['num_images']} images "
                      f"({first['num_groups']} scan groups): difference (setting - baseline) with its paired 95 % "
                      f"interval and p-value ({first['test']} for accuracy and the matching test for Dice; "
                      "evaluation.compare), then Holm-adjusted over every test of this table.", "",
                      markdown_table(header, cells)]) + "\n"


def write_sweep_tables(rows: Sequence[dict], out: Path, title: str, split: str, baseline: str = "") -> str:
    """sweep.md, sweep.csv and sweep.png in `out` (and sweep_paired.json with a `baseline` setting); returns the
    markdown."""
    from utils.runs import write_json_atomic
    from visualization.sweep import save_latency_figure, save_sweep_figure

    out.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(rows, title, split)
    if baseline:
        tests = paired_against(rows, baseline, split)
        write_json_atomic({"baseline": baseline, "split": split, "tests": tests}, out / "sweep_paired.json")
        markdown += render_paired(tests, baseline)
    (out / "sweep.md").write_text(markdown, encoding="utf-8")
    write_csv(rows, out / "sweep.csv")
    points = [{"name": row["setting"].name, **{k: row["summary"][k] for k in ("accuracy", "dice")
                                                if k in row["summary"]},
               **({"latency_ms": row["latency_b1_ms"]} if "latency_b1_ms" in row else {})} for row in rows]
    save_sweep_figure(points, out / "sweep.png", f"{title} ({split} split; mean ± std over seeds)")
    if any("latency_ms" in point for point in points):
        save_latency_figure(points, out / "sweep_latency.png",
                            f"{title}: quality against CPU latency ({split} split)")
    return markdown


