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


def test_a_prediction_maps_its_mask_back_once_and_thresholds_the_logits():
    """ImagePrediction: the mask at the image's own size is the resized logits >= log(t / (1 - t)), the same
    pixels as sigmoid >= t; threshold 0 keeps every pixel and 1 none."""
    import numpy as np

    from datasets.geometry import Placement, logits_to_original
    from prediction.folder import ImagePrediction

    torch.manual_seed(3)
    seg = F.avg_pool2d(torch.randn(1, 1, 32, 32) * 20, 5, 1, 2)
    placement = Placement("stretch", (90, 70), 32)
    prediction = ImagePrediction(probabilities=np.full(4, 0.25), seg_logits=seg, threshold=0.4,
                                 model_input=torch.zeros(3, 32, 32), size=(70, 90), seconds=0.0, placement=placement)
    logits = logits_to_original(seg, (90, 70), placement)[0, 0].numpy()
    assert prediction.tumour_logits.shape == (90, 70) and np.array_equal(prediction.tumour_logits, logits)
    assert prediction.tumour_logits is prediction.tumour_logits  # mapped back once
    probability = torch.sigmoid(torch.from_numpy(logits)).numpy()
    assert np.allclose(prediction.tumour_probability, probability)
    for threshold in (None, 0.05, 0.5, 0.93):
        cut = 0.4 if threshold is None else threshold
        mask = prediction.mask(threshold)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        assert np.array_equal(mask > 0, probability >= cut) and 0 < (mask > 0).sum() < mask.size
    assert (prediction.mask(0.0) == 255).all() and (prediction.mask(1.0) == 0).all()
