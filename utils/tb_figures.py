"""TensorBoard figures: the confusion matrix and input / ground-truth / prediction overlays."""
from __future__ import annotations

import torch
import torch.nn as nn

from utils.config import Config


def denormalize(images: torch.Tensor, mean: list, std: list) -> torch.Tensor:
    """Normalised (B, C, H, W) images back to [0, 1], replicated to 3 channels for display."""
    channels = images.shape[1]
    mean_t = torch.tensor(mean[:channels] if channels == len(mean) else [sum(mean) / len(mean)] * channels)
    std_t = torch.tensor(std[:channels] if channels == len(std) else [sum(std) / len(std)] * channels)
    out = images.float().cpu() * std_t.view(1, -1, 1, 1) + mean_t.view(1, -1, 1, 1)
    out = out.clamp(0, 1)
    return out.repeat(1, 3, 1, 1) if channels == 1 else out


def overlay(images: torch.Tensor, masks: torch.Tensor, colour: tuple[float, float, float], alpha: float = 0.45
            ) -> torch.Tensor:
    """Paint binary (B, 1, H, W) masks over [0, 1] RGB images."""
    tint = torch.tensor(colour).view(1, 3, 1, 1)
    masks = masks.float().cpu()
    return images * (1 - alpha * masks) + tint * alpha * masks


def log_confusion_matrix(writer, cm: list, class_names: list[str], epoch: int) -> None:
    import matplotlib.pyplot as plt

    from utils.visualize import confusion_matrix_figure

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
    base = denormalize(images, cfg.data.mean, cfg.data.std)
    grid = torch.cat([base, overlay(base, masks, (0.0, 1.0, 0.0)), overlay(base, pred, (1.0, 0.0, 0.0))])
    writer.add_image("val/overlays", torchvision.utils.make_grid(grid, nrow=len(samples)), epoch)
