"""Training losses: the multi-task loss and its segmentation terms."""
from losses.multitask import MultiTaskLoss, balanced_class_weights
from losses.segmentation import SegmentationLoss, dice_loss, focal_per_image, tversky_loss

__all__ = ["MultiTaskLoss", "SegmentationLoss", "balanced_class_weights", "dice_loss", "focal_per_image",
           "tversky_loss"]
