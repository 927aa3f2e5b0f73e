"""EfficientMTNet, its Hamburger (NMF) module, the registry and encoder freezing."""
from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from model import build_model, list_models
from model.efficient_mtnet import EfficientMTNet, upsample_nearest
from model.freeze import set_encoder_frozen
from model.hamburger import NMF2D, Hamburger, nmf, random_bases

torch.set_num_threads(1)


def _seg_loss_like(out: dict) -> torch.Tensor:
    """A loss touching every output: classification, main segmentation and each auxiliary map."""
    labels = torch.arange(out["cls"].shape[0]) % out["cls"].shape[1]
    loss = F.cross_entropy(out["cls"], labels)
    loss = loss + F.binary_cross_entropy_with_logits(out["seg"], torch.rand_like(out["seg"]).round())
    for aux in out.get("aux", []):
        loss = loss + 0.4 * F.binary_cross_entropy_with_logits(aux, torch.rand_like(aux).round())
    return loss


@pytest.mark.parametrize("in_channels,size", [(3, (64, 64)), (1, (250, 250)), (3, (97, 130))])
def test_output_contract_train_and_eval(in_channels: int, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = build_model("efficient_mtnet", num_classes=4, in_channels=in_channels)
    x = torch.randn(2, in_channels, *size)

    model.train()
    out = model(x)
    assert set(out) == {"cls", "seg", "aux"}
    assert out["cls"].shape == (2, 4)
    assert out["seg"].shape == (2, 1, *size)
    assert len(out["aux"]) == 2
    for aux, stride in zip(out["aux"], (8, 16)):  # stride-8 then stride-16 decoder levels
        assert aux.shape[:2] == (2, 1)
        assert aux.shape[-2:] == tuple(-(-s // stride) for s in size)

    model.eval()
    with torch.no_grad():
        out = model(x)
    assert set(out) == {"cls", "seg"}
    assert out["cls"].shape == (2, 4) and out["seg"].shape == (2, 1, *size)
    assert torch.isfinite(out["seg"]).all() and torch.isfinite(out["cls"]).all()


def test_parameter_count_band_and_width_multiplier() -> None:
    default = sum(p.numel() for p in EfficientMTNet().parameters())
    assert 1.38e6 * 0.95 <= default <= 1.38e6 * 1.05, default
    narrow = EfficientMTNet(width_mult=0.5)
    assert sum(p.numel() for p in narrow.parameters()) < 0.5 * default
    out = narrow.eval()(torch.randn(1, 3, 64, 64))
    assert out["seg"].shape == (1, 1, 64, 64)


def test_deep_supervision_off_builds_no_aux_heads() -> None:
    model = EfficientMTNet(deep_supervision=False).train()
    assert model.aux_heads is None
    assert "aux" not in model(torch.randn(2, 3, 64, 64))
    with_aux = sum(p.numel() for p in EfficientMTNet(deep_supervision=True).parameters())
    assert sum(p.numel() for p in model.parameters()) < with_aux


def test_every_parameter_gets_a_gradient() -> None:
    torch.manual_seed(1)
    model = EfficientMTNet().train()
    _seg_loss_like(model(torch.randn(2, 3, 64, 64))).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"parameters without gradient: {missing}"


def test_nmf_reconstruction_error_falls_and_factors_stay_non_negative() -> None:
    torch.manual_seed(2)
    # a non-negative matrix with some low-rank structure plus noise, like ReLU features
    x = torch.relu(torch.rand(2, 32, 6) @ torch.rand(2, 6, 100) + 0.1 * torch.randn(2, 32, 100))
    x.requires_grad_(True)
    bases, coef, errors = nmf(x, random_bases(2, 32, 8), steps=10, return_errors=True)
    assert len(errors) == 12
    assert all(later <= earlier + 1e-6 for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.8 * errors[0], errors
    assert (bases >= 0).all() and (coef >= 0).all()
    assert bases.shape == (2, 32, 8) and coef.shape == (2, 100, 8)
    # one-step gradient: only the last coefficient update is differentiable, the bases come from no_grad
    assert coef.requires_grad and not bases.requires_grad
    coef.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_nmf2d_train_random_eval_fixed_and_float32_under_autocast() -> None:
    ham = NMF2D(16, rank=4)
    x = torch.relu(torch.randn(2, 16, 5, 7))
    ham.train()
    assert not torch.allclose(ham(x), ham(x))  # fresh random bases every training forward
    ham.eval()
    assert torch.equal(ham(x), ham(x))
    assert "bases" in ham.state_dict() and ham.state_dict()["bases"].shape == (1, 16, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = ham(x.bfloat16())
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert torch.allclose(low.float(), ham(x), rtol=0.05, atol=0.05)


def test_hamburger_keeps_shape() -> None:
    block = Hamburger(40, ham_channels=16, rank=4).eval()
    x = torch.randn(3, 40, 6, 9)
    assert block(x).shape == x.shape


def test_eval_is_deterministic_and_survives_a_state_dict_round_trip() -> None:
    torch.manual_seed(3)
    model = EfficientMTNet().eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        first, second = model(x), model(x)
    assert torch.equal(first["seg"], second["seg"]) and torch.equal(first["cls"], second["cls"])
    torch.manual_seed(99)  # a different initialisation, then the saved weights and bases
    rebuilt = EfficientMTNet()
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        again = rebuilt.eval()(x)
    assert torch.equal(first["seg"], again["seg"]) and torch.equal(first["cls"], again["cls"])


def test_autocast_bf16_and_channels_last() -> None:
    torch.manual_seed(4)
    model = EfficientMTNet().eval()
    x = torch.randn(2, 3, 80, 80)
    with torch.no_grad():
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        cl = model_cl(x.contiguous(memory_format=torch.channels_last))
    assert low["seg"].shape == (2, 1, 80, 80) and torch.isfinite(low["seg"].float()).all()
    assert torch.allclose(cl["seg"], reference["seg"], atol=1e-4)
    assert torch.allclose(cl["cls"], reference["cls"], atol=1e-5)


def test_onnx_export_of_the_eval_path_matches_eager() -> None:
    onnx = pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    torch.manual_seed(5)
    model = EfficientMTNet().eval()
    x = torch.randn(1, 3, 64, 64)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["image"], output_names=["cls", "seg"])
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(proto)
    cls, seg = ReferenceEvaluator(proto).run(None, {"image": x.numpy()})
    with torch.no_grad():
        expected = model(x)
    np.testing.assert_allclose(cls, expected["cls"].numpy(), atol=1e-4)
    np.testing.assert_allclose(seg, expected["seg"].numpy(), atol=1e-3)


def test_compute_grows_linearly_with_pixels() -> None:
    model = EfficientMTNet().eval()

    def flops(size: int) -> int:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.randn(1, 3, size, size))
        return counter.get_total_flops()

    small, large = flops(64), flops(128)
    assert 3.6 * small <= large <= 4.4 * small  # 4x the pixels, ~4x the work (attention would give more)


def test_fast_upsample_equals_interpolate() -> None:
    x = torch.randn(2, 3, 5, 8)
    for size in [(10, 16), (9, 15), (10, 15), (9, 16)]:
        assert torch.equal(upsample_nearest(x, size), F.interpolate(x, size=size, mode="nearest"))


def test_unknown_model_name_lists_known_models() -> None:
    assert "efficient_mtnet" in list_models()
    with pytest.raises(KeyError, match="efficient_mtnet"):
        build_model("efficient_mtnt")


def test_bad_stage_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="four rows"):
        EfficientMTNet(stages=[(1, 16, 1, 0.0)])
    with pytest.raises(ValueError, match="at least one block"):
        EfficientMTNet(stages=[(1, 16, 1, 0.0), (4, 24, 0, 0.0), (6, 32, 1, 0.0), (6, 64, 1, 0.0)])


def test_encoder_stages_and_freezing() -> None:
    model = EfficientMTNet()
    stages = model.encoder_stages()
    assert len(stages) == 5 and stages[0] is model.encoder["stem"] and stages[-1] is model.encoder["stage4"]
    total = sum(p.numel() for p in model.parameters())
    encoder = sum(p.numel() for p in model.encoder.parameters())

    frozen, trainable = set_encoder_frozen(model, True)
    assert (frozen, trainable) == (encoder, total - encoder)
    assert not any(p.requires_grad for p in model.encoder.parameters())

    # BatchNorm in the frozen encoder stays in eval mode through model.train() and keeps its statistics
    model.train()
    bn = model.encoder["stage2"][0].block[0][1]
    assert isinstance(bn, nn.BatchNorm2d)
    before = bn.running_mean.clone()
    model(torch.randn(2, 3, 64, 64) * 3 + 1)
    assert not bn.training and torch.equal(bn.running_mean, before)
    assert model.decoder.laterals[0][1].training  # the decoder trains normally

    frozen, trainable = set_encoder_frozen(model, False)
    assert (frozen, trainable) == (0, total)
    model.train()
    model(torch.randn(2, 3, 64, 64) * 3 + 1)
    assert bn.training and not torch.equal(bn.running_mean, before)

    first_two = sum(p.numel() for stage in stages[:2] for p in stage.parameters())
    assert set_encoder_frozen(model, True, stages=2) == (first_two, total - first_two)
    assert all(p.requires_grad for p in model.encoder["stage2"].parameters())
    with pytest.raises(ValueError, match="freeze_stages"):
        set_encoder_frozen(model, True, stages=6)
