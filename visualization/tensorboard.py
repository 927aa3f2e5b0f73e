"""TensorBoard figures: the confusion matrix and input / ground-truth / prediction overlays."""
from __future__ import annotations

import torch
import torch.nn as nn

from utils.config import Config
from visualization.common import denormalize, overlay


def log_confusion_matrix(writer, cm: list, class_names: list[str], epoch: int) -> None:
    import matplotlib.pyplot as plt

    from visualization.confusion import confusion_matrix_figure

    fig = confusion_matrix_figure(cm, class_names)
    writer.add_figure("val/confusion_matrix", fig, epoch)
    plt.close(fig)


@torch.no_grad()
def log_overlays(writer, model: nn.Module, dataset, device: torch.device, cfg: Config, epoch: int,
                 count: int = 8) -> None:
    """A fixed set of validation images: rows of input, ground truth (green) and prediction (red)."""
    import torchvision

    step = max(1, len(dataset) // count)
    samples = [dataset[i] for i in range(0, min(len(dataset), step * count), step)][:count]
    images = torch.stack([s["image"] for s in samples])
    masks = torch.stack([s["mask"] for s in samples])
    model.eval()
    logits = model(images.to(device))["seg"].float().cpu()
    pred = (torch.sigmoid(logits) >= cfg.eval.threshold).float()
    base = denormalize(images, cfg.data.preprocess.mean, cfg.data.preprocess.std)
    grid = torch.cat([base, overlay(base, masks, (0.0, 1.0, 0.0)), overlay(base, pred, (1.0, 0.0, 0.0))])
    writer.add_image("val/overlays", torchvision.utils.make_grid(grid, nrow=len(samples)), epoch)
