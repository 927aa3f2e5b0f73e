"""Paths, a runner for the entry points and small run artefacts, shared by the end-to-end tests."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
SHARED_BRISC = REPO.parent / "shared" / "data" / "brisc2025"


def run_entry(args: list[str], cwd: Path, timeout: int = 300, env_extra: dict | None = None
              ) -> subprocess.CompletedProcess:
    """Run `python <args>` from the repository with a small thread count; returns the finished process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def coarse_imagefolder(base: Path) -> Path:
    """An imagefolder test split `<base>/folders/Testing/{tumour,normal}` of the test images of another generated
    dataset (seed 17, 12 images): a second source with a coarser label space."""
    import shutil

    from datasets.synthetic import generate

    source = generate(base / "source", 4, 12, seed=17, verbose=False)
    root = base / "folders"
    for class_name in ("glioma", "meningioma", "pituitary", "no_tumor"):
        target = root / "Testing" / ("normal" if class_name == "no_tumor" else "tumour")
        target.mkdir(parents=True, exist_ok=True)
        for image in sorted((source / "classification_task" / "test" / class_name).glob("*.jpg")):
            shutil.copyfile(image, target / image.name)
    return root


def copy_test_images(root: Path, folder: Path, class_name: str = "glioma", count: int = 2) -> Path:
    """`count` test images of one class of a BRISC-layout `root`, copied into a new `folder` (for --input)."""
    folder.mkdir()
    for image in sorted((root / "classification_task" / "test" / class_name).glob("*.jpg"))[:count]:
        (folder / image.name).write_bytes(image.read_bytes())
    return folder


def save_untrained_checkpoint(data_root: Path, folder: Path, overrides: Sequence[str] = ()) -> Path:
    """A seeded, untrained demo model saved as `folder/best.pth`, a run checkpoint of the BRISC-layout
    `data_root` at 64 px (its predictions vary per image, which is all scoring tests need); `overrides`
    (`data.preprocess.resize=head`, ...) change its config."""
    import torch

    from model import build_model
    from model.loading import model_kwargs
    from utils.config import config_to_dict, load_config

    cfg = load_config("configs/demo.yaml", [f"data.root={data_root}", "data.generated.enabled=false", "data.preprocess.image_size=64",
                                            "data.loader.num_workers=0", "data.loader.cache=none", "eval.batch_size=16",
                                            *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model.name, **model_kwargs(cfg))
    path = folder / "best.pth"
    torch.save({"format_version": 1, "model_name": cfg.model.name, "config": config_to_dict(cfg),
                "model": model.state_dict(), "ema": None, "epoch": 0, "class_counts": None}, path)
    return path
