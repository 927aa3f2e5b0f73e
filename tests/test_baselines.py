"""Comparison models: output contract at awkward sizes, encoder stages, pretrained weights, FLOP counting."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from model import build_model, list_models, model_tasks
from model.baselines import UNet, pad_to_multiple
from model.pretrained import PretrainedWeightsError
from model.freeze import set_encoder_frozen
from model.segnext import MSCAN
from tests.helpers import REPO
from utils.config import load_config
from utils.flops import count_parameters, flop_counter_flops, nmf_macs, thop_macs

BASELINES = ["unet", "light_unet", "resnet_unet", "mobilenetv2_unet", "efficientnet_b0_unet", "segformer", "segnext",
             "vit", "hac_caspp_unet", "efficientnet_b0_cls"]
CLASSIFICATION_ONLY = {"efficientnet_b0_cls"}  # no segmentation output
CHEAP = [name for name in list_models() if name != "vit"]  # ViT-B/16 (86 M parameters) gets its own cheap test


pytestmark = pytest.mark.usefixtures("one_thread")  # models are timed and trained on one thread


def _check_contract(model: nn.Module, x: torch.Tensor, num_classes: int) -> dict:
    out = model(x)
    assert out["cls"].shape == (x.shape[0], num_classes)
    assert torch.isfinite(out["cls"]).all()
    if "seg" not in model_tasks(model):
        assert set(out) == {"cls"}  # a classification-only model returns no (fake) mask
        return out
    assert out["seg"].shape == (x.shape[0], 1, *x.shape[-2:])
    assert torch.isfinite(out["seg"]).all()
    if not model.training:
        assert "aux" not in out
    return out


def test_every_baseline_is_registered():
    assert set(BASELINES) <= set(list_models())


@pytest.mark.parametrize("name", CHEAP)
def test_contract_train_and_eval_at_size_not_multiple_of_32(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=3, in_channels=3, deep_supervision=True)
    x = torch.randn(2, 3, 50, 70)
    out = _check_contract(model.train(), x, 3)
    if name in BASELINES:
        assert "aux" not in out  # the comparison models have no deep supervision
    (out["cls"].sum() + (out["seg"].mean() if "seg" in out else 0)).backward()
    assert all(p.grad is not None for p in model.encoder_stages()[-1].parameters())
    with torch.no_grad():
        _check_contract(model.eval(), x, 3)


@pytest.mark.parametrize("name", [n for n in BASELINES if n != "vit"])
def test_encoder_stages_belong_to_encoder_and_last_runs_with_a_feature_map(name):
    model = build_model(name).eval()
    stages = model.encoder_stages()
    encoder_params = {id(p) for p in model.encoder.parameters()}
    stage_params = [id(p) for stage in stages for p in stage.parameters()]
    assert len(stages) >= 4 and set(stage_params) <= encoder_params
    assert len(stage_params) == len(set(stage_params))  # no parameter in two stages
    seen = []
    handle = stages[-1].register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    handle.remove()
    # the deepest feature map (the Grad-CAM target), at the network's output stride
    assert len(seen) == 1 and seen[0].dim() == 4 and seen[0].shape[-1] == 64 // getattr(model, "size_multiple", 32)

    first_two = sum(p.numel() for stage in stages[:2] for p in stage.parameters())
    assert set_encoder_frozen(model, True, stages=2)[0] == first_two
    total = count_parameters(model)
    assert set_encoder_frozen(model, True) == (count_parameters(model.encoder), total - count_parameters(model.encoder))
    assert set_encoder_frozen(model, False) == (0, total)


def test_one_input_channel():
    model = build_model("segformer", in_channels=1).eval()
    with torch.no_grad():
        _check_contract(model, torch.randn(1, 1, 64, 64), 4)


def test_vit_eval_at_size_not_multiple_of_16():
    model = build_model("vit").eval()
    assert 85e6 < count_parameters(model) < 87e6
    with torch.no_grad():
        _check_contract(model, torch.randn(1, 3, 40, 56), 4)
    assert len(model.encoder_stages()) == 13  # patch embedding + 12 blocks


def test_pad_to_multiple():
    x = torch.randn(1, 2, 250, 33)
    padded = pad_to_multiple(x, 32)
    assert padded.shape[-2:] == (256, 64)
    assert torch.equal(padded[..., :250, :33], x) and padded[..., 250:, :].abs().sum() == 0
    assert pad_to_multiple(padded, 32) is padded


@pytest.mark.parametrize("name, millions", [("unet", 31.04), ("light_unet", 1.93), ("segformer", 3.72),
                                            ("segnext", 4.23), ("hac_caspp_unet", 18.30),
                                            ("efficientnet_b0_cls", 4.01)])
def test_parameter_counts(name, millions):
    assert count_parameters(build_model(name)) / 1e6 == pytest.approx(millions, abs=0.01)


def test_baseline_configs_load_and_name_their_model():
    variants = {"mobilenetv2_unet_seg": "mobilenetv2_unet"}  # another recipe of a registered model
    paths = sorted(p for p in (REPO / "configs" / "baselines").glob("*.yaml") if not p.stem.endswith("_cpu"))
    assert {p.stem for p in paths} == set(BASELINES) | set(variants)
    for path in paths:
        cfg = load_config(path)
        assert cfg.model.name == variants.get(path.stem, path.stem)
        assert cfg.data.preprocess.image_size == (224 if path.stem in CLASSIFICATION_ONLY else 256)
        assert cfg.experiment.name == f"baseline_{path.stem}"


def test_cpu_baseline_configs_share_the_efficient_mtnet_cpu_recipe():
    """Like-for-like: the CPU comparison runs differ from configs/brisc_cpu_stretch.yaml (the recipe they were
    measured beside) only in the model."""
    from utils.config import config_to_dict

    reference = config_to_dict(load_config(REPO / "configs" / "brisc_cpu_stretch.yaml"))
    paths = sorted((REPO / "configs" / "baselines").glob("*_cpu.yaml"))
    assert {p.stem for p in paths} == {"mobilenetv2_unet_cpu", "segformer_cpu"}
    for path in paths:
        cfg = config_to_dict(load_config(path))
        assert cfg["model"]["name"] == path.stem[: -len("_cpu")]
        for section in ("data", "optim", "sched", "train", "eval"):
            assert cfg[section] == reference[section], section
        assert {k: v for k, v in cfg["loss"].items() if k != "aux_weights"} == \
            {k: v for k, v in reference["loss"].items() if k != "aux_weights"}


# --------------------------------------------------------------------------------------------- pretrained weights
def test_local_pretrained_file_loads(tmp_path: Path):
    torch.manual_seed(1)
    source = build_model("light_unet")
    path = tmp_path / "encoder.pth"
    torch.save(source.encoder.state_dict(), path)
    loaded = build_model("light_unet", pretrained=str(path))
    for key, value in source.encoder.state_dict().items():
        assert torch.equal(loaded.encoder.state_dict()[key], value), key
    # a whole-model checkpoint under "model" works too; its decoder keys are ignored
    torch.save({"model": source.state_dict()}, path)
    loaded = build_model("light_unet", pretrained=str(path))
    assert torch.equal(loaded.encoder.stages[2][1][0].weight, source.encoder.stages[2][1][0].weight)


def test_rgb_pretrained_file_loads_into_one_channel_model(tmp_path: Path):
    source = build_model("light_unet")
    path = tmp_path / "encoder.pth"
    torch.save(source.encoder.state_dict(), path)
    gray = build_model("light_unet", in_channels=1, pretrained=str(path))
    first = source.encoder.stages[0][0].weight
    assert torch.allclose(gray.encoder.stages[0][0].weight, first.sum(dim=1, keepdim=True))


def test_mismatched_pretrained_file_is_a_clear_error(tmp_path: Path):
    path = tmp_path / "other.pth"
    torch.save(UNet(widths=(16, 32, 64, 128)).encoder.state_dict(), path)
    with pytest.raises(PretrainedWeightsError, match=r"other\.pth.*light_unet.*stages\.0\.0\.weight"):
        build_model("light_unet", pretrained=str(path))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_model("light_unet", pretrained=str(tmp_path / "missing.pth"))


def test_mscan_accepts_official_key_names():
    expected = MSCAN().state_dict()
    official = {
        "patch_embed1.proj.0.weight": "stages.0.embed.0.weight",
        "patch_embed2.norm.running_mean": "stages.1.embed.1.running_mean",
        "patch_embed4.proj.weight": "stages.3.embed.0.weight",
        "block3.4.attn.spatial_gating_unit.conv0.weight": "stages.2.blocks.4.attn.spatial_gating_unit.local.weight",
        "block3.4.attn.spatial_gating_unit.conv2_2.weight":
            "stages.2.blocks.4.attn.spatial_gating_unit.strips.2.1.weight",
        "block1.0.attn.spatial_gating_unit.conv3.bias": "stages.0.blocks.0.attn.spatial_gating_unit.mix.bias",
        "backbone.block1.0.mlp.dwconv.dwconv.bias": "stages.0.blocks.0.mlp.dwconv.bias",
        "block2.1.layer_scale_1": "stages.1.blocks.1.layer_scale_1",
        "norm4.weight": "stages.3.norm.weight",
    }
    converted = MSCAN.convert_state_dict({k: torch.zeros(1) for k in official})
    assert list(converted) == list(official.values())
    assert set(converted) <= set(expected)


def test_imagenet_offline_fails_fast_with_advice(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "https://weights.invalid")  # a reserved name that never resolves
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.perf_counter()
    with pytest.raises(PretrainedWeightsError, match=r"cannot be reached.*local file"):
        build_model("resnet_unet", pretrained="imagenet")
    assert time.perf_counter() - start < 5.0
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PretrainedWeightsError, match="switched off"):
        build_model("vit", pretrained="imagenet")
    with pytest.raises(PretrainedWeightsError, match="no ImageNet weights"):
        build_model("unet", pretrained="imagenet")


# --------------------------------------------------------------------------------------------- counting
@pytest.mark.parametrize("layer, shape, macs", [
    (nn.Conv2d(3, 8, 3, padding=1, bias=False), (1, 3, 16, 16), 16 * 16 * 8 * 3 * 9),
    (nn.Conv2d(8, 16, 3, stride=2, padding=1), (2, 8, 16, 16), 2 * 8 * 8 * 16 * 8 * 9),
    (nn.Conv2d(16, 16, 5, padding=2, groups=16, bias=False), (1, 16, 10, 12), 10 * 12 * 16 * 25),
    (nn.ConvTranspose2d(8, 4, 2, stride=2), (1, 8, 10, 10), 10 * 10 * 8 * 4 * 4),
])
def test_single_layer_macs_match_hand_count(layer, shape, macs):
    x = torch.randn(shape)
    assert thop_macs(layer, x) == macs
    assert flop_counter_flops(layer, x) == 2 * macs


def test_matmul_rules_match_flop_counter():
    from segmentation_models_pytorch.encoders.mix_transformer import Attention as MiTAttention
    from timm.layers.attention import Attention

    from model.hamburger import NMF2D

    nmf = NMF2D(32, rank=8).eval()
    x = torch.rand(2, 32, 12, 10)
    assert thop_macs(nmf, x) == nmf_macs(32, 120, 8, nmf.eval_steps, batch=2) == flop_counter_flops(nmf, x) / 2
    attention = Attention(64, num_heads=4).eval()  # fused scaled_dot_product_attention
    tokens = torch.randn(2, 50, 64)
    linears = 2 * 50 * 64 * (3 * 64 + 64)
    assert thop_macs(attention, tokens) == linears + 2 * 2 * 50 * 50 * 64 == flop_counter_flops(attention, tokens) / 2

    class Reduced(nn.Module):  # SegFormer attention with spatial reduction 2 on an 8x6 map
        def __init__(self) -> None:
            super().__init__()
            self.attn = MiTAttention(64, num_heads=2, sr_ratio=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, 8, 6)

    reduced, tokens = Reduced().eval(), torch.randn(2, 48, 64)
    # the same matmuls and linears; thop also charges 4 ops per element of the LayerNorm on the reduced keys
    assert thop_macs(reduced, tokens) - flop_counter_flops(reduced, tokens) / 2 == 4 * (2 * 12 * 64)
