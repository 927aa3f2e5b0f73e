"""Load test of the web demo's prediction path: N concurrent clients for T seconds, uploads of 512x512 slices
and 40-megapixel files mixed, every answer checked against the same file's answer computed alone.

    python scripts/load_test_demo.py [--clients 8] [--seconds 60] [--checkpoint runs/demo/latest/best.pth]
                                     [--big-every 4] [--gradcam] [--json out.json]

What it drives: the functions a page run calls for an upload, in the order `app.py` calls them, on ONE model
shared by all clients as Streamlit's `st.cache_resource` shares it: `prediction.demo.read_upload` ->
`prediction.folder.predict_image` (-> `prediction.demo.gradcam_view` with --gradcam), each client in its own
thread as Streamlit runs each browser session's script in its own thread. Not driven: Streamlit's websocket
protocol and page rendering (see docs/faults.md, "Web demo under load", for why and what that leaves out).

Reported: requests, failures, answers that differ from the file's own answer (and whether they equal another
client's file: a leak), latency p50 / p95 / max per upload kind, and the peak resident memory of this process
(VmHWM: the server's process, all threads) beside its resident memory before the load.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BIG_SIZE = (7296, 5480)  # width x height: 39.98 megapixels, under the page's 40-megapixel limit


def memory_kib(field_name: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process from /proc, in KiB (0 where /proc is absent)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def client_files(client: int) -> dict[str, tuple[str, bytes]]:
    """Two uploads that only this client sends: a 512x512 slice (PNG) and a 40-megapixel file (JPEG) of another
    slice; every client's are different pictures, so an answer can be traced to the file it belongs to."""
    from datasets.synthetic import render

    small, _ = render(np.random.default_rng([2026, client]), client % 4, "ax", (512, 512))
    other, _ = render(np.random.default_rng([2027, client]), (client + 1) % 4, "co", (512, 512))
    big = cv2.resize(other, BIG_SIZE, interpolation=cv2.INTER_LINEAR)
    ok_small, png = cv2.imencode(".png", small)
    ok_big, jpeg = cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok_small and ok_big
    return {"slice": (f"client{client}_slice.png", png.tobytes()), "big": (f"client{client}_40mp.jpg", jpeg.tobytes())}


@dataclass
class Answer:
    probabilities: np.ndarray
    tumour: Optional[np.ndarray]  # the tumour probability map at the file's own size
    cam: Optional[np.ndarray] = None

    def differs(self, other: "Answer", atol: float = 1e-4) -> Optional[str]:
        """Which part differs from `other` beyond `atol` ("probabilities", "tumour", "cam"), or None."""
        for part in ("probabilities", "tumour", "cam"):
            a, b = getattr(self, part), getattr(other, part)
            if (a is None) != (b is None):
                return part
            if a is not None and (a.shape != b.shape or not np.allclose(a, b, atol=atol)):
                return part
        return None

    def same(self, other: "Answer") -> bool:
        return self.differs(other) is None


def page_answer(model, cfg, name: str, data: bytes, gradcam: bool) -> Answer:
    """What one page run computes for an upload (app.py: read_upload, predict_image, gradcam_view)."""
    from prediction import demo
    from prediction.folder import predict_image

    grey = demo.read_upload(data, name)
    prediction = predict_image(model, cfg, grey)
    cam = demo.gradcam_view(model, cfg, prediction, grey) if gradcam else None
    return Answer(prediction.probabilities, prediction.tumour_probability, cam)


@dataclass
class Report:
    requests: int = 0
    failures: list = field(default_factory=list)
    mismatches: list = field(default_factory=list)  # (client, kind, part that differs, whose file it matched)
    latency: dict = field(default_factory=lambda: {"slice": [], "big": []})

    def summary(self, rss_before_kib: int, clients: int, seconds: float) -> dict:
        def pct(values: list[float], q: float) -> Optional[float]:
            return round(float(np.percentile(values, q)), 3) if values else None

        return {
            "clients": clients, "seconds": seconds, "requests": self.requests, "failures": len(self.failures),
            "failure_examples": self.failures[:3], "mismatches": len(self.mismatches),
            "leaks": sum(1 for m in self.mismatches if m[3] is not None), "mismatch_examples": self.mismatches[:3],
            "latency_s": {kind: {"n": len(v), "p50": pct(v, 50), "p95": pct(v, 95), "max": pct(v, 100)}
                          for kind, v in self.latency.items()},
            "rss_before_mib": round(rss_before_kib / 1024, 1), "peak_rss_mib": round(memory_kib("VmHWM") / 1024, 1),
        }


def run_load(model, cfg, clients: int, seconds: float, big_every: int = 4, gradcam: bool = False) -> dict:
    """N client threads on one shared model for `seconds`; each sends its own slice, and every `big_every`-th
    request its own 40-megapixel file (0: never). Returns the summary (see `Report.summary`)."""
    files = {c: client_files(c) for c in range(clients)}
    # The reference: each file's answer computed alone, before any concurrency.
    expected = {(c, kind): page_answer(model, cfg, *files[c][kind], gradcam)
                for c in range(clients) for kind in ("slice", "big") if kind == "slice" or big_every > 0}
    rss_before = memory_kib("VmRSS")
    report, guard = Report(), threading.Lock()
    start = threading.Barrier(clients)
    stop_at = [0.0]

    def client(c: int) -> None:
        start.wait()
        with guard:
            stop_at[0] = stop_at[0] or time.perf_counter() + seconds
        n = 0
        while time.perf_counter() < stop_at[0]:
            n += 1
            kind = "big" if big_every > 0 and n % big_every == 0 else "slice"
            began = time.perf_counter()
            try:
                answer = page_answer(model, cfg, *files[c][kind], gradcam)
            except Exception as exc:  # noqa: BLE001 - every failure is counted and reported, none is hidden
                with guard:
                    report.requests += 1
                    report.failures.append(f"client {c} {kind}: {type(exc).__name__}: {exc}")
                continue
            took = time.perf_counter() - began
            with guard:
                report.requests += 1
                report.latency[kind].append(took)
                if not answer.same(expected[(c, kind)]):
                    whose = next((k for k, ref in expected.items() if k != (c, kind) and answer.same(ref)), None)
                    report.mismatches.append((c, kind, answer.differs(expected[(c, kind)]), whose))

    threads = [threading.Thread(target=client, args=(c,), name=f"client{c}") for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return report.summary(rss_before, clients, seconds)


def seeded_checkpoint(folder: Path, image_size: int = 128) -> Path:
    """A seeded, untrained EfficientMTNet of configs/demo.yaml saved as a run checkpoint (for a load test
    without a trained run: the cost per request is the same)."""
    import torch

    from model import build_model
    from model.loading import model_kwargs
    from utils.config import config_to_dict, load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml",
                      [f"data.preprocess.image_size={image_size}", "data.generated.enabled=false"])
    torch.manual_seed(0)
    model = build_model(cfg.model.name, **model_kwargs(cfg))
    path = folder / "best.pth"
    torch.save({"format_version": 1, "model_name": cfg.model.name, "config": config_to_dict(cfg),
                "model": model.state_dict(), "ema": None, "epoch": 0, "class_counts": None}, path)
    return path


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: a seeded untrained demo model")
    parser.add_argument("--big-every", type=int, default=4, help="every K-th request a 40-megapixel file (0: none)")
    parser.add_argument("--gradcam", action="store_true", help="also compute the page's Grad-CAM per request")
    parser.add_argument("--json", type=Path, default=None, help="write the summary here too")
    args = parser.parse_args(argv)
    from model.loading import load_model_from_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or seeded_checkpoint(Path(tmp))
        model, cfg, _ = load_model_from_checkpoint(checkpoint, "cpu")
        summary = run_load(model, cfg, args.clients, args.seconds, args.big_every, args.gradcam)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0 if summary["failures"] == 0 and summary["mismatches"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
