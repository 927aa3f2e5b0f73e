"""datasets.geometry.resize_bilinear: OpenCV on a CPU gives torch's bilinear resize (align_corners=False), the
reference, within 2e-5 of the maps' largest magnitude (OpenCV's interpolation weights are rounded floats), up and
down, square or not, several maps at once."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from datasets.geometry import resize_bilinear


@pytest.mark.parametrize("shape,size", [((1, 1, 128, 128), (512, 512)), ((2, 3, 128, 128), (300, 517)),
                                        ((1, 1, 128, 96), (64, 40)), ((1, 2, 7, 5), (1, 1)), ((1, 1, 1, 1), (9, 4))])
def test_matches_torch_bilinear(shape, size):
    torch.manual_seed(0)
    maps = torch.randn(shape) * 8
    got = resize_bilinear(maps, size)
    want = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert (got - want).abs().max().item() <= 2e-5 * maps.abs().max().item()


def test_non_contiguous_and_half_inputs():
    torch.manual_seed(1)
    maps = torch.randn(1, 1, 140, 128)[..., 6:134, :]  # a letterbox crop: a view, not contiguous
    want = F.interpolate(maps, size=(256, 256), mode="bilinear", align_corners=False)
    limit = 2e-5 * maps.abs().max().item()
    assert (resize_bilinear(maps, (256, 256)) - want).abs().max().item() <= limit
    assert (resize_bilinear(maps.half(), (256, 256)) - want).abs().max().item() < 1e-2  # fp16 inputs: their rounding


def test_thresholded_masks_agree_with_torch():
    """A smooth logit map, as the decoder makes: the masks at 0 are the same pixels."""
    torch.manual_seed(2)
    logits = F.avg_pool2d(torch.randn(1, 1, 128, 128) * 20, 9, 1, 4) - 1
    got = resize_bilinear(logits, (512, 512)) >= 0
    want = F.interpolate(logits, size=(512, 512), mode="bilinear", align_corners=False) >= 0
    assert 0 < want.sum() < want.numel() and torch.equal(got, want)
