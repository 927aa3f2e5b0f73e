"""Prediction on a folder of unlabelled images (`test.py --input`): a mask PNG per image and one CSV of classes
and probabilities."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from datasets import CLASS_NAMES
from evaluation.inference import predict
from model.loading import load_model_from_checkpoint
from utils.runtime import select_device


@torch.no_grad()
def predict_folder(checkpoint: Path, input_dir: Path, out_dir: Optional[Path], device_name: str = "auto",
                   threshold: Optional[float] = None, tta: bool = False, use_ema: bool = True) -> Path:
    """Classify and segment every image in `input_dir`; write `<stem>_mask.png` files and `predictions.csv`."""
    import cv2

    from datasets.transforms import load_image_for_inference

    device = select_device(device_name)
    model, cfg, _ = load_model_from_checkpoint(checkpoint, device, use_ema=use_ema)
    threshold = cfg.eval.threshold if threshold is None else threshold
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"--input '{input_dir}' is not a folder of images")
    files = sorted(p for p in input_dir.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".bmp", ".tif",
                                                                         ".tiff"})
    if not files:
        raise FileNotFoundError(f"--input '{input_dir}' holds no .jpg/.png/.bmp/.tif images")
    out_dir = Path(out_dir) if out_dir else Path(checkpoint).resolve().parent / "predictions"
    has_seg = "seg" in getattr(model, "tasks", ("cls", "seg"))  # classification-only models write the CSV alone
    (out_dir / "masks" if has_seg else out_dir).mkdir(parents=True, exist_ok=True)
    rows = []
    for path in files:
        image, original_size = load_image_for_inference(path, cfg.data)
        outputs = predict(model, image.unsqueeze(0).to(device), tta=tta)
        probs = torch.softmax(outputs["cls"].float(), 1)[0].cpu()
        row = {"file": path.name, "predicted_class": CLASS_NAMES[int(probs.argmax())]}
        if has_seg:
            mask = (torch.sigmoid(outputs["seg"].float())[0, 0] >= threshold).cpu().numpy().astype(np.uint8) * 255
            mask = cv2.resize(mask, original_size, interpolation=cv2.INTER_NEAREST)  # back to (width, height)
            cv2.imwrite(str(out_dir / "masks" / f"{path.stem}_mask.png"), mask)
            row["tumour_pixels"] = int((mask > 0).sum())
        row.update({f"p_{name}": round(float(p), 6) for name, p in zip(CLASS_NAMES, probs)})
        rows.append(row)
    with open(out_dir / "predictions.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    masks = f"masks in {out_dir / 'masks'}, " if has_seg else ""
    print(f"{len(rows)} images: {masks}classes and probabilities in {out_dir / 'predictions.csv'}")
    return out_dir
