"""MultiTaskLoss and the segmentation terms: minima, empty masks, has_mask, gradients, weights, autocast."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from losses import MultiTaskLoss, SegmentationLoss, balanced_class_weights
from utils.config import LossConfig, SegLossConfig

torch.set_num_threads(1)

TERMS = ("bce", "dice", "focal", "tversky")
SIZE = 16


def only(term: str, **extra) -> SegLossConfig:
    """A segmentation config with just `term` switched on."""
    weights = {name: 1.0 if name == term else 0.0 for name in TERMS}
    return SegLossConfig(**weights, **extra)


def masks(batch: int = 3, seed: int = 0) -> torch.Tensor:
    """Random blob-like masks, the last one empty (a no-tumour image)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = (torch.rand(batch, 1, SIZE // 4, SIZE // 4, generator=gen) > 0.6).float()
    out = F.interpolate(coarse, size=(SIZE, SIZE), mode="nearest")
    out[-1] = 0
    out[0, 0, 0, 0] = 1  # at least one tumour pixel in the first image
    return out


def logits_for(target: torch.Tensor, confidence: float) -> torch.Tensor:
    """Logits that predict `target` with the given confidence (negative: the opposite prediction)."""
    return (target * 2 - 1) * confidence


def seg_term(term: str, logits: torch.Tensor, target: torch.Tensor, **extra) -> torch.Tensor:
    loss = SegmentationLoss(only(term, **extra))
    _, terms = loss(logits, target, torch.ones(target.shape[0]))
    return terms[term]


def make_batch(batch: int = 3, seed: int = 0, aux_sizes: tuple = (8, 4)) -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(seed)
    mask = masks(batch, seed)
    outputs = {
        "cls": torch.randn(batch, 4, generator=gen, requires_grad=True),
        "seg": torch.randn(batch, 1, SIZE, SIZE, generator=gen, requires_grad=True),
        "aux": [torch.randn(batch, 1, s, s, generator=gen, requires_grad=True) for s in aux_sizes],
    }
    data = {"label": torch.arange(batch) % 4, "mask": mask, "has_mask": torch.ones(batch, dtype=torch.bool),
            "id": [f"img{i}" for i in range(batch)]}
    return outputs, data


# --------------------------------------------------------------------------------------------- minima
@pytest.mark.parametrize("term", TERMS)
def test_term_is_minimal_for_perfect_prediction_and_grows_when_worse(term):
    target = masks()
    perfect = seg_term(term, logits_for(target, 20.0), target)
    unsure = seg_term(term, torch.zeros_like(target), target)
    inverted = seg_term(term, logits_for(target, -20.0), target)
    assert perfect.item() == pytest.approx(0.0, abs=1e-4)
    assert perfect < unsure < inverted


def test_classification_term_is_minimal_for_a_perfect_prediction():
    labels = torch.tensor([0, 1, 2, 3])
    loss = MultiTaskLoss(LossConfig(seg_weight=0.0, aux_weights=[]))
    perfect = loss.classification(F.one_hot(labels, 4).float() * 30, labels)
    wrong = loss.classification(F.one_hot((labels + 1) % 4, 4).float() * 30, labels)
    assert perfect.item() == pytest.approx(0.0, abs=1e-6)
    assert wrong > 10


def test_bce_and_focal_match_reference_implementations():
    gen = torch.Generator().manual_seed(1)
    target = masks()
    logits = torch.randn(target.shape, generator=gen) * 3
    assert seg_term("bce", logits, target).item() == pytest.approx(
        F.binary_cross_entropy_with_logits(logits, target).item(), rel=1e-6)
    reference = sigmoid_focal_loss(logits, target, alpha=0.25, gamma=2.0, reduction="mean")
    assert seg_term("focal", logits, target, focal_alpha=0.25, focal_gamma=2.0).item() == pytest.approx(
        reference.item(), rel=1e-5)


def test_dice_and_tversky_hand_computed():
    # One 1x2 image: probabilities 0.8 (tumour pixel) and 0.4 (background pixel).
    target = torch.tensor([[[[1.0, 0.0]]]])
    logits = torch.logit(torch.tensor([[[[0.8, 0.4]]]]))
    tp, fp, fn, s = 0.8, 0.4, 0.2, 1.0
    assert seg_term("dice", logits, target, smooth=s).item() == pytest.approx(
        1 - (2 * tp + s) / (2 * tp + fp + fn + s), rel=1e-6)
    assert seg_term("tversky", logits, target, smooth=s, tversky_alpha=0.3, tversky_beta=0.7).item() == \
        pytest.approx(1 - (tp + s) / (tp + 0.3 * fp + 0.7 * fn + s), rel=1e-6)


def test_dice_per_image_and_per_batch_differ_as_defined():
    # Image 1: perfect 2-pixel tumour; image 2: empty mask with one confident false positive.
    target = torch.tensor([[[[1.0, 1.0, 0.0, 0.0]]], [[[0.0, 0.0, 0.0, 0.0]]]])
    logits = torch.tensor([[[[50.0, 50.0, -50.0, -50.0]]], [[[50.0, -50.0, -50.0, -50.0]]]])
    per_image = seg_term("dice", logits, target, smooth=1.0, dice_per_image=True)
    per_batch = seg_term("dice", logits, target, smooth=1.0, dice_per_image=False)
    # per image: mean(0, 1 - 1 / (1 + 1)); per batch: TP = 2, FP = 1, FN = 0 over both images.
    assert per_image.item() == pytest.approx(0.25, abs=1e-6)
    assert per_batch.item() == pytest.approx(1 - 5 / 6, abs=1e-6)


# --------------------------------------------------------------------------------------------- empty masks
@pytest.mark.parametrize("term", TERMS)
def test_empty_masks_are_finite_near_zero_when_empty_and_penalise_false_positives(term):
    empty = torch.zeros(2, 1, SIZE, SIZE)
    clean = seg_term(term, torch.full_like(empty, -20.0), empty)
    false_positive_logits = torch.full_like(empty, -20.0)
    false_positive_logits[:, :, :4, :4] = 20.0  # 16 confidently predicted tumour pixels per image
    noisy = seg_term(term, false_positive_logits, empty)
    unsure = seg_term(term, torch.zeros_like(empty), empty)
    for value in (clean, noisy, unsure):
        assert torch.isfinite(value)
    assert clean.item() == pytest.approx(0.0, abs=1e-4)
    assert noisy > clean
    # Dice: 1 - s / (sum(p) + s); Tversky: 1 - s / (alpha * sum(p) + s); s = 1, 16 false positives, alpha 0.3
    if term == "dice":
        assert noisy.item() == pytest.approx(1 - 1 / 17, rel=1e-4)
    if term == "tversky":
        assert noisy.item() == pytest.approx(1 - 1 / (0.3 * 16 + 1), rel=1e-4)


# --------------------------------------------------------------------------------------------- has_mask
def full_config() -> LossConfig:
    return LossConfig(seg=SegLossConfig(bce=1.0, dice=1.0, focal=0.5, tversky=0.5))


def test_unannotated_samples_change_nothing_in_the_segmentation_loss():
    loss = MultiTaskLoss(full_config())
    outputs, batch = make_batch(3)
    _, base = loss(outputs, batch)

    extra_out, extra_batch = make_batch(1, seed=7)
    extra_batch["mask"] = torch.full_like(extra_batch["mask"], float("nan"))  # whatever it holds
    seg = torch.cat([outputs["seg"], extra_out["seg"]]).detach().requires_grad_(True)
    aux = [torch.cat([a, b]).detach().requires_grad_(True) for a, b in zip(outputs["aux"], extra_out["aux"])]
    merged_out = {"cls": torch.cat([outputs["cls"], extra_out["cls"]]), "seg": seg, "aux": aux}
    merged = {"label": torch.cat([batch["label"], extra_batch["label"]]),
              "mask": torch.cat([batch["mask"], extra_batch["mask"]]),
              "has_mask": torch.tensor([True, True, True, False])}
    total, terms = loss(merged_out, merged)
    seg_names = [name for name in terms if name.startswith(("seg", "aux_"))]
    assert set(seg_names) == {"seg", "seg_bce", "seg_dice", "seg_focal", "seg_tversky", "aux_0", "aux_1"}
    for name in seg_names:
        assert terms[name].item() == pytest.approx(base[name].item(), rel=1e-6, abs=1e-7), name
    total.backward()
    assert torch.all(seg.grad[3] == 0) and all(torch.all(a.grad[3] == 0) for a in aux)
    assert seg.grad[:3].abs().sum() > 0


def test_batch_without_annotations_gives_exact_zero_and_finite_gradients():
    loss = MultiTaskLoss(full_config())
    outputs, batch = make_batch(2)
    batch["has_mask"] = torch.zeros(2, dtype=torch.bool)
    total, terms = loss(outputs, batch)
    for name in ("seg", "seg_bce", "seg_dice", "seg_focal", "seg_tversky", "aux_0", "aux_1"):
        assert terms[name].item() == 0.0, name
    assert terms["total"].item() == pytest.approx(terms["cls"].item(), rel=1e-6)
    total.backward()
    assert torch.all(outputs["seg"].grad == 0) and torch.isfinite(outputs["cls"].grad).all()


# --------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("term", TERMS)
def test_gradient_flows_through_each_segmentation_term(term):
    target = masks()
    logits = torch.randn(target.shape, generator=torch.Generator().manual_seed(3), requires_grad=True)
    value = seg_term(term, logits, target)
    (grad,) = torch.autograd.grad(value, logits)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_gradient_reaches_every_output_and_total_is_the_weighted_sum():
    cfg = LossConfig(cls_weight=0.4, seg_weight=0.6, aux_weights=[0.3, 0.1], seg=SegLossConfig(dice=0.5, focal=0.5,
                                                                                                bce=0.0))
    loss = MultiTaskLoss(cfg)
    outputs, batch = make_batch(3)
    total, terms = loss(outputs, batch)
    assert set(terms) == {"cls", "seg", "seg_dice", "seg_focal", "aux_0", "aux_1", "total"}
    assert all(not value.requires_grad for value in terms.values()) and total.requires_grad
    expected = 0.4 * terms["cls"] + 0.6 * terms["seg"] + 0.3 * terms["aux_0"] + 0.1 * terms["aux_1"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms["seg"].item() == pytest.approx(0.5 * (terms["seg_dice"] + terms["seg_focal"]).item(), rel=1e-6)
    total.backward()
    for tensor in [outputs["cls"], outputs["seg"], *outputs["aux"]]:
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------- deep supervision
def test_aux_outputs_are_upsampled_bilinearly_to_the_mask():
    cfg = LossConfig(aux_weights=[1.0, 0.5])
    loss = MultiTaskLoss(cfg)
    outputs, batch = make_batch(3)
    _, terms = loss(outputs, batch)
    seg_only = SegmentationLoss(cfg.seg)
    for index, aux in enumerate(outputs["aux"]):
        upsampled = F.interpolate(aux, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        expected, _ = seg_only(upsampled, batch["mask"], torch.ones(3))
        assert terms[f"aux_{index}"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_aux_weights_zero_skips_and_too_few_weights_is_an_error():
    outputs, batch = make_batch(3)
    _, terms = MultiTaskLoss(LossConfig(aux_weights=[0.0, 0.2]))(outputs, batch)
    assert "aux_0" not in terms and "aux_1" in terms
    with pytest.raises(ValueError, match="aux_weights"):
        MultiTaskLoss(LossConfig(aux_weights=[0.4]))(outputs, batch)
    eval_outputs = {"cls": outputs["cls"], "seg": outputs["seg"]}  # eval mode: no aux
    _, terms = MultiTaskLoss(LossConfig())(eval_outputs, batch)
    assert not any(name.startswith("aux_") for name in terms)


# --------------------------------------------------------------------------------------------- classification
def test_label_smoothing_matches_its_definition():
    gen = torch.Generator().manual_seed(5)
    logits, labels, eps = torch.randn(6, 4, generator=gen), torch.tensor([0, 1, 2, 3, 1, 2]), 0.1
    loss = MultiTaskLoss(LossConfig(label_smoothing=eps, seg_weight=0.0))
    log_p = torch.log_softmax(logits, 1)
    by_hand = ((1 - eps) * -log_p.gather(1, labels[:, None]).squeeze(1) + eps * -log_p.mean(1)).mean()
    assert loss.classification(logits, labels).item() == pytest.approx(by_hand.item(), rel=1e-6)
    perfect = F.one_hot(labels, 4).float() * 30
    assert loss.classification(perfect, labels) > 0.1  # smoothing keeps a confident prediction from reaching 0


def test_class_weights_balanced_given_and_errors():
    gen = torch.Generator().manual_seed(6)
    logits, labels = torch.randn(8, 4, generator=gen), torch.tensor([0, 0, 0, 1, 1, 2, 3, 3])
    counts = [30, 20, 10, 40]
    expected = [100 / (4 * c) for c in counts]
    assert balanced_class_weights(counts) == pytest.approx(expected)
    balanced = MultiTaskLoss(LossConfig(class_weights="balanced", label_smoothing=0.05), class_counts=counts)
    reference = F.cross_entropy(logits, labels, weight=torch.tensor(expected), label_smoothing=0.05)
    assert balanced.classification(logits, labels).item() == pytest.approx(reference.item(), rel=1e-6)

    given = MultiTaskLoss(LossConfig(class_weights=[1.0, 2.0, 0.5, 1.0]), class_counts=counts)
    reference = F.cross_entropy(logits, labels, weight=torch.tensor([1.0, 2.0, 0.5, 1.0]))
    assert given.classification(logits, labels).item() == pytest.approx(reference.item(), rel=1e-6)
    unweighted = MultiTaskLoss(LossConfig())
    assert unweighted.classification(logits, labels).item() == pytest.approx(
        F.cross_entropy(logits, labels).item(), rel=1e-6)

    with pytest.raises(ValueError, match="class_counts"):
        MultiTaskLoss(LossConfig(class_weights="balanced"))
    with pytest.raises(ValueError, match="positive training count"):
        MultiTaskLoss(LossConfig(class_weights="balanced"), class_counts=[3, 0, 2, 1])
    with pytest.raises(ValueError, match="3 weights"):
        MultiTaskLoss(LossConfig(class_weights=[1.0, 1.0, 1.0])).classification(logits, labels)


# --------------------------------------------------------------------------------------------- dtype / config
def test_half_precision_outputs_are_scored_in_float32_under_autocast():
    loss = MultiTaskLoss(full_config())
    outputs, batch = make_batch(3)
    half = {"cls": outputs["cls"].detach().bfloat16(), "seg": outputs["seg"].detach().bfloat16(),
            "aux": [a.detach().bfloat16() for a in outputs["aux"]]}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, terms = loss(half, batch)
    reference_out = {key: (value.float() if torch.is_tensor(value) else [a.float() for a in value])
                     for key, value in half.items()}
    reference_total, reference = loss(reference_out, batch)
    assert total.dtype == torch.float32 and all(v.dtype == torch.float32 for v in terms.values())
    for name, value in reference.items():
        assert terms[name].item() == pytest.approx(value.item(), rel=1e-6), name
    assert math.isfinite(total.item())


def test_only_active_terms_are_reported_and_bad_configs_are_rejected():
    outputs, batch = make_batch(2)
    _, terms = MultiTaskLoss(LossConfig(seg_weight=0.0, aux_weights=[]))(outputs, batch)
    assert set(terms) == {"cls", "total"}
    _, terms = MultiTaskLoss(LossConfig(cls_weight=0.0, seg=SegLossConfig(bce=0.0, dice=1.0, tversky=1.0)))(
        outputs, batch)
    assert set(terms) == {"seg", "seg_dice", "seg_tversky", "aux_0", "aux_1", "total"}
    bad = [
        (LossConfig(seg=SegLossConfig(bce=0.0, dice=0.0)), "no term with a positive weight"),
        (LossConfig(seg=SegLossConfig(smooth=0.0)), "loss.seg.smooth"),
        (LossConfig(cls_weight=0.0, seg_weight=0.0), "nothing to train"),
        (LossConfig(label_smoothing=1.0), "label_smoothing"),
        (LossConfig(aux_weights=[-0.1]), "aux_weights"),
        (LossConfig(seg=SegLossConfig(focal=1.0, focal_alpha=1.5)), "focal_alpha"),
    ]
    for cfg, message in bad:
        with pytest.raises(ValueError, match=message):
            MultiTaskLoss(cfg)
