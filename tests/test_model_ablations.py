"""EfficientMTNet's ablation switches: each builds and keeps the output contract, parameter counts differ by the
hand-computed amounts, and the default model is exactly the model as it was before the switches existed."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from model import build_model, check_model_kwargs
from model.blocks import SqueezeExcite
from model.efficient_mtnet import EfficientMTNet, SingleScaleDecoder
from model.hamburger import SelfAttention2D
from utils.config import ConfigError
from utils.flops import attention_macs, thop_macs

DEFAULT_PARAMS = 1_385_359  # the default model (4 classes, deep supervision), counted before the switches existed


def params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_default_model_is_unchanged():
    assert params(EfficientMTNet()) == DEFAULT_PARAMS
    explicit = EfficientMTNet(context="nmf", se=True, decoder="fpn")
    default = EfficientMTNet()
    assert list(explicit.state_dict()) == list(default.state_dict())  # old checkpoints still load


@pytest.mark.parametrize("kwargs", [{"context": "none"}, {"context": "breads"}, {"context": "attention"},
                                    {"context": "attention", "attn_heads": 4}, {"se": False},
                                    {"decoder": "single"}, {"decoder": "single", "deep_supervision": False},
                                    {"output_stride": 2}])
def test_every_switch_keeps_the_output_contract(kwargs, one_thread):
    model = build_model("efficient_mtnet", num_classes=4, **kwargs)
    x = torch.randn(2, 3, 97, 130)
    model.train()
    out = model(x)
    assert out["cls"].shape == (2, 4) and out["seg"].shape == (2, 1, 97, 130)
    assert len(out.get("aux", [])) == (0 if kwargs.get("decoder") == "single" else 2)
    (out["cls"].sum() + out["seg"].sum()).backward()
    model.eval()
    with torch.no_grad():
        first, second = model(x), model(x)
    assert "aux" not in first and torch.equal(first["seg"], second["seg"])  # deterministic in evaluation


def test_parameter_counts_differ_by_the_hand_computed_amounts():
    c, h = 168, 64  # stride-32 channels and the Hamburger width at width 1.0
    breads = (c * h + h) + (h * c + 2 * c)  # lower 1x1 conv with bias; upper 1x1 conv without bias + BN
    assert params(EfficientMTNet(context="none")) == DEFAULT_PARAMS - breads
    assert params(EfficientMTNet(context="breads")) == DEFAULT_PARAMS  # NMF itself has no parameters
    qkv = h * 3 * h + 3 * h
    assert params(EfficientMTNet(context="attention")) == DEFAULT_PARAMS + qkv
    assert params(EfficientMTNet(context="attention", attn_heads=4)) == DEFAULT_PARAMS + qkv

    default = EfficientMTNet()
    se = sum(params(m) for m in default.modules() if isinstance(m, SqueezeExcite))
    assert se > 0 and params(EfficientMTNet(se=False)) == DEFAULT_PARAMS - se
    assert not any(isinstance(m, SqueezeExcite) for m in EfficientMTNet(se=False).modules())

    d = 48  # decoder width; the stride-8 stage has 48 channels
    single = (d * d + 2 * d) + (9 * d + 2 * d) + (d * d + 2 * d)  # lateral + depthwise-separable smoothing
    fpn_and_aux = params(default.decoder) + params(default.aux_heads)
    assert params(EfficientMTNet(decoder="single")) == DEFAULT_PARAMS - fpn_and_aux + single
    assert params(SingleScaleDecoder([32, 48, 80, 168], d)) == single

    stem = 16  # stem channels: the stride-2 level's lateral 1x1 reads them
    stem_level = (stem * d + 2 * d) + (9 * d + 2 * d) + (d * d + 2 * d)  # lateral + depthwise-separable smoothing
    assert params(EfficientMTNet(output_stride=2)) == DEFAULT_PARAMS + stem_level == 1_389_151


def test_output_stride_2_feeds_the_head_from_the_stem_level(one_thread):
    model = EfficientMTNet(output_stride=2).eval()
    seen = {}
    model.seg_head.register_forward_hook(lambda module, inputs, output: seen.update(shape=inputs[0].shape))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 128, 96))
    assert seen["shape"][-2:] == (64, 48) and out["seg"].shape == (1, 1, 128, 96)
    default = EfficientMTNet().eval()
    default.seg_head.register_forward_hook(lambda module, inputs, output: seen.update(shape=inputs[0].shape))
    with torch.no_grad():
        default(torch.randn(1, 3, 128, 96))
    assert seen["shape"][-2:] == (32, 24)


def test_attention_is_softmax_attention_and_counted():
    torch.manual_seed(0)
    attention = SelfAttention2D(8, heads=2)
    x = torch.randn(1, 8, 3, 4)
    q, k, v = attention.qkv(x).reshape(1, 3, 2, 4, 12).unbind(1)  # (1, heads, d, N)
    weights = torch.softmax(q.transpose(-1, -2) @ k / 2.0, dim=-1)  # sqrt(d) = 2
    expected = (weights @ v.transpose(-1, -2)).transpose(-1, -2).reshape(1, 8, 3, 4)
    assert torch.allclose(attention(x), expected, atol=1e-5)
    # thop counts the 1x1 projection (24 outputs x 8 inputs per pixel) plus both attention products
    assert thop_macs(attention, x) == 24 * 8 * 12 + attention_macs(12, 12, 8)


@pytest.mark.parametrize("kwargs,message", [({"context": "lightham"}, "'context' must be one of"),
                                            ({"decoder": "unet"}, "'decoder' must be one of"),
                                            ({"context": "attention", "attn_heads": 5}, "heads"),
                                            ({"output_stride": 8}, "'output_stride' must be one of"),
                                            ({"output_stride": 2, "decoder": "single"}, "needs decoder='fpn'")])
def test_bad_switch_values_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EfficientMTNet(**kwargs)


def test_unknown_constructor_argument_names_the_config_key():
    check_model_kwargs("efficient_mtnet", {"context": "none", "se": False})
    with pytest.raises(ConfigError, match="'model.kwargs.ham_rnk'.*Did you mean 'model.kwargs.ham_rank'"):
        check_model_kwargs("efficient_mtnet", {"ham_rnk": 8})
