"""Prediction speed as a user meets it, per inference runtime, side by side in one run: `test.py --input` on a
folder of N images (decoding, prediction, mask PNGs and the CSV included) and the web demo's per-upload model
latency (`prediction.folder.predict_image` on a decoded upload and its mask, as app.py calls them).

    python scripts/prediction_timing.py --checkpoint runs/brisc_cpu/latest/best.pth \
        --images ../shared/data/brisc2025/classification_task/train --side 512 --count 1000 --uploads 50

Each runtime's export is made (and checked against PyTorch) before the clock starts: its time is reported on its
own, as a user pays it once per checkpoint. The folder timings are repeated `--repeats` times, the settings taking
turns (so a slow minute of the machine hits them all), and reported as the median with the range. Timings depend
on the machine's load: run it on a quiet machine and quote the threads. Results: a Markdown table on stdout, and
`--json FILE`.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python scripts/prediction_timing.py` from anywhere
    sys.path.insert(0, str(REPO))

from datasets.index import IMAGE_SUFFIXES  # noqa: E402
from utils.cli import RUNTIME_CHOICES, positive_int, run_main  # noqa: E402
from utils.tables import markdown_table  # noqa: E402


def image_files(root: Path, count: int, side: Optional[int] = None) -> list[Path]:
    """The first `count` images under `root` (sorted, recursively); with `side`, only side x side files."""
    from PIL import Image

    files = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        if side is not None:
            with Image.open(path) as image:  # reads the header only
                if image.size != (side, side):
                    continue
        files.append(path)
        if len(files) == count:
            break
    if not files:
        raise SystemExit(f"--images '{root}' holds no images" + (f" of {side}x{side} pixels" if side else ""))
    return files


def linked_folder(files: list[Path], folder: Path) -> Path:
    """A flat folder of symbolic links to `files` (unique names), as `test.py --input` takes it."""
    folder.mkdir(parents=True)
    for index, path in enumerate(files):
        (folder / f"{index:05d}_{path.name}").symlink_to(path.resolve())
    return folder


def time_folder(checkpoint: Path, folder: Path, out: Path, runtime: str, batch_size: Optional[int],
                workers: Optional[int] = None) -> float:
    from prediction.folder import predict_folder

    start = time.perf_counter()
    failed = predict_folder(checkpoint, folder, out, "cpu", runtime=runtime, batch_size=batch_size, workers=workers)
    seconds = time.perf_counter() - start
    if failed:
        raise SystemExit(f"{len(failed)} images could not be predicted ({failed[:3]} ...)")
    return seconds


def time_uploads(checkpoint: Path, files: list[Path], runtime: str) -> list[float]:
    """Milliseconds of `predict_image` and its mask per upload with the demo's predictor (decoding excluded)."""
    import torch

    from evaluation.predictor import prediction_predictor, prediction_runtime
    from model.loading import load_model_from_checkpoint
    from prediction.demo import read_upload
    from prediction.folder import predict_image

    device = torch.device("cpu")
    model, cfg, ckpt = load_model_from_checkpoint(checkpoint, device)
    chosen, precision, automatic = prediction_runtime(cfg.eval, runtime, None, device)
    predictor = model if chosen == "torch" else prediction_predictor(checkpoint, chosen, precision, automatic, device,
                                                                     loaded=ckpt)
    greys = [read_upload(path.read_bytes(), path.name) for path in files]
    predict_image(predictor, cfg, greys[0])  # warm-up
    times = []
    for grey in greys:
        start = time.perf_counter()
        predict_image(predictor, cfg, grey).mask()  # the page shows the mask at the upload's size
        times.append(1000 * (time.perf_counter() - start))
    return times


def prepare_export(checkpoint: Path, runtime: str) -> float:
    """Seconds to export and check the runtime (0 for eager torch; a cached export only loads)."""
    if runtime == "torch":
        return 0.0
    from evaluation.predictor import inference_predictor

    start = time.perf_counter()
    inference_predictor(checkpoint, runtime, "fp32", "cpu")
    return time.perf_counter() - start


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True, help="a folder of images (searched recursively)")
    parser.add_argument("--count", type=positive_int, default=1000, help="images in the folder prediction")
    parser.add_argument("--uploads", type=positive_int, default=50, help="single uploads timed per runtime")
    parser.add_argument("--side", type=positive_int, default=None, help="only square files of this side (e.g. 512)")
    parser.add_argument("--runtimes", nargs="+", default=["torch", "onnxruntime"], choices=RUNTIME_CHOICES)
    parser.add_argument("--batch-size", type=positive_int, default=None, help="test.py --batch-size (default: config)")
    parser.add_argument("--workers", nargs="+", type=int, default=[0, -1],
                        help="test.py --input batches in flight to time, each (0: one batch after another, the "
                             "eager path's way; -1: the default)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="folder timings per setting (median)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    import torch

    files = image_files(args.images, args.count, args.side)
    settings = [(runtime, workers) for runtime in args.runtimes for workers in args.workers]
    exports, uploads, folder_s = {}, {}, {setting: [] for setting in settings}
    with tempfile.TemporaryDirectory() as scratch:
        folder = linked_folder(files, Path(scratch) / "input")
        for runtime in args.runtimes:
            exports[runtime] = prepare_export(args.checkpoint, runtime)
            uploads[runtime] = time_uploads(args.checkpoint, files[:args.uploads], runtime)
        for repeat in range(args.repeats):
            for runtime, workers in settings:
                out = Path(scratch) / f"out_{runtime}_{workers}_{repeat}"
                folder_s[runtime, workers].append(time_folder(args.checkpoint, folder, out, runtime, args.batch_size,
                                                              None if workers < 0 else workers))
                shutil.rmtree(out)
    results = []
    for runtime, workers in settings:
        seconds = statistics.median(folder_s[runtime, workers])
        results.append({"runtime": runtime, "workers": "default" if workers < 0 else workers,
                        "export_s": exports[runtime], "folder_s": seconds, "folder_s_all": folder_s[runtime, workers],
                        "folder_img_s": len(files) / seconds, "upload_ms_median": statistics.median(uploads[runtime]),
                        "upload_ms_p95": sorted(uploads[runtime])[int(0.95 * (len(uploads[runtime]) - 1))]})
    base = results[0]
    rows = []
    for r in results:
        folder = f"{r['folder_s']:.2f} ({min(r['folder_s_all']):.2f}-{max(r['folder_s_all']):.2f})"
        rows.append([r["runtime"], str(r["workers"]), f"{r['export_s']:.1f}", folder, f"{r['folder_img_s']:.1f}",
                     f"{base['folder_s'] / r['folder_s']:.2f}x", f"{r['upload_ms_median']:.1f}",
                     f"{r['upload_ms_p95']:.1f}", f"{base['upload_ms_median'] / r['upload_ms_median']:.2f}x"])
    sizes = f" of {args.side}x{args.side} px" if args.side else ""
    print(f"\n{len(files)} images{sizes} from {args.images} (folder prediction), {min(args.uploads, len(files))} uploads; "
          f"CPU, {torch.get_num_threads()} threads; speed-up against {base['runtime']} with "
          f"{base['workers']} folder threads; folder: median (range) of {args.repeats} runs\n")
    print(markdown_table(["runtime", "folder threads", "export (s, once)", "folder (s)", "folder img/s", "folder speed-up",
                          "upload ms (median)", "upload ms (p95)", "upload speed-up"], rows))
    if args.json:
        args.json.write_text(json.dumps({"images": len(files), "threads": torch.get_num_threads(),
                                         "results": results}, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    from utils.allocator import keep_freed_memory

    keep_freed_memory()
    sys.exit(run_main(main))
