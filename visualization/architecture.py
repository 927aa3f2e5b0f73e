"""EfficientMTNet's block diagram, described from the model as built (stages, channels, parameters, FLOPs)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from visualization.common import PathLike, new_figure, save_figure


@dataclass
class StageSummary:
    name: str
    channels: int
    stride: int
    detail: str  # block structure, e.g. "3 x MBConv e6 + SE"
    params: int


@dataclass
class ArchitectureSummary:
    """What the architecture figure shows, read from a built model by a probing forward pass."""

    image_size: int
    in_channels: int
    num_classes: int
    stages: list[StageSummary]
    context: str
    context_params: int
    decoder_channels: int
    decoder_strides: list[int]
    decoder_params: int
    seg_head: str
    seg_head_params: int
    aux_strides: list[int]
    aux_params: int
    cls_head: str
    cls_head_params: int
    total_params: int
    gflops: float
    seg_stride: int = 4  # the stride of the level the segmentation head reads (2 with model.kwargs.output_stride 2)
    stem_level_params: int = 0  # the stride-2 level (stem lateral + the stride-4 level upsampled), when present


def _params(module: Optional[nn.Module]) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _fmt_params(count: int) -> str:
    return f"{count / 1e6:.2f} M" if count >= 1e6 else f"{count / 1e3:.1f} k" if count >= 1e3 else str(count)


def _stage_detail(stage: nn.Module) -> str:
    blocks = [m for m in stage.modules() if type(m).__name__ == "InvertedResidual"]
    has_se = any("SqueezeExcite" in type(m).__name__ for m in stage.modules())
    if not blocks:
        convs = [m for m in stage.modules() if isinstance(m, nn.Conv2d)]
        return " + ".join(f"conv {c.kernel_size[0]}×{c.kernel_size[1]} /{c.stride[0]}" for c in convs[:2]) or "-"
    expansions = {_expansion(block) for block in blocks}
    expand = f" e{'/'.join(f'{e:g}' for e in sorted(expansions))}" if None not in expansions else ""
    return f"{len(blocks)} × MBConv{expand}{' + SE' if has_se else ''}"


def _expansion(block: nn.Module) -> Optional[float]:
    """Expansion ratio of an inverted residual: its first convolution is a 1x1 expansion, or none (ratio 1)."""
    first = next((m for m in block.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        return None
    if first.groups > 1:  # starts with the depthwise convolution: no expansion layer
        return 1.0
    return round(first.out_channels / first.in_channels, 1)


def _linear_chain(head: nn.Module) -> str:
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    dropout = next((m.p for m in head.modules() if isinstance(m, nn.Dropout)), None)
    dims = " → ".join([str(linears[0].in_features)] + [str(m.out_features) for m in linears]) if linears else "-"
    return f"global average pool → FC {dims}" + (f"\n(ReLU, dropout {dropout:g})" if dropout is not None else "")


def _conv_chain(head: nn.Module) -> str:
    convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
    parts = []
    for conv in convs:
        kind = "dw " if conv.groups > 1 and conv.groups == conv.in_channels else ""
        parts.append(f"{kind}{conv.kernel_size[0]}×{conv.kernel_size[1]} {conv.in_channels}→{conv.out_channels}")
    return "\n".join(parts) if parts else "-"


HEADLINE_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "efficient_mtnet_brisc.yaml"


def configured_model(config: PathLike = HEADLINE_CONFIG) -> nn.Module:
    """The model a config builds (by default the headline recipe's: stride-2 mask level), untrained."""
    from model import build_model
    from model.loading import model_kwargs
    from utils.config import load_config

    cfg = load_config(config)
    return build_model(cfg.model.name, **model_kwargs(cfg, pretrained=False))


def describe_architecture(model: Optional[nn.Module] = None, image_size: int = 256) -> ArchitectureSummary:
    """Channels, strides, block structure and parameters of EfficientMTNet (the headline config's model when
    None, not the constructor defaults), read from the model: a forward pass at `image_size` with hooks on the
    encoder stages and the decoder."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    from utils.checkpoint import unwrap_model
    from visualization.gradcam import layer_name

    if model is None:
        model = configured_model()
    model = unwrap_model(model)
    required = ("encoder_stages", "context", "decoder", "seg_head", "cls_head")
    missing = [name for name in required if not hasattr(model, name)]
    if missing:
        raise ValueError(f"draw_architecture draws EfficientMTNet; {type(model).__name__} has no "
                         f"{', '.join(missing)}")
    probe = copy.deepcopy(model).float().cpu()  # the probe's training-mode pass must not touch the caller's BN stats
    in_channels = next(m for m in probe.modules() if isinstance(m, nn.Conv2d)).in_channels
    x = torch.zeros(1, in_channels, image_size, image_size)
    shapes: dict[int, torch.Size] = {}
    stages = probe.encoder_stages()
    hooks = [stage.register_forward_hook(lambda m, i, o, k=k: shapes.__setitem__(k, o.shape))
             for k, stage in enumerate(stages)]
    levels: list[torch.Size] = []
    hooks.append(probe.decoder.register_forward_hook(lambda m, i, o: levels.extend(t.shape for t in o)))
    head_input: list[torch.Size] = []
    hooks.append(probe.seg_head.register_forward_hook(lambda m, i, o: head_input.append(i[0].shape)))
    probe.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = probe(x)
    for hook in hooks:
        hook.remove()
    probe.train()
    with torch.no_grad():
        aux = probe(x).get("aux", [])
    names = [layer_name(probe, stage).split(".")[-1] for stage in stages]
    stage_rows = [StageSummary(names[k], int(shapes[k][1]), image_size // int(shapes[k][-1]),
                               _stage_detail(stage), _params(stage)) for k, stage in enumerate(stages)]
    ham = next((m for m in probe.context.modules() if hasattr(m, "rank") and hasattr(m, "train_steps")), None)
    bread = next((m for m in probe.context.modules() if isinstance(m, nn.Conv2d)), None)
    context = type(probe.context).__name__
    if ham is not None and bread is not None:
        context = (f"lower bread 1×1 {bread.in_channels}→{bread.out_channels}, ReLU\nham: NMF rank {ham.rank}, "
                   f"{ham.train_steps}/{ham.eval_steps} steps (train/eval)\nupper bread 1×1 {bread.out_channels}→"
                   f"{bread.in_channels}, BN; + residual")
    aux_heads = getattr(probe, "aux_heads", None)
    return ArchitectureSummary(
        image_size=image_size, in_channels=in_channels, num_classes=int(out["cls"].shape[1]), stages=stage_rows,
        context=context, context_params=_params(probe.context),
        decoder_channels=int(levels[0][1]) if levels else 0,
        decoder_strides=[image_size // int(s[-1]) for s in levels], decoder_params=_params(probe.decoder),
        seg_head=_conv_chain(probe.seg_head), seg_head_params=_params(probe.seg_head),
        aux_strides=[image_size // int(a.shape[-1]) for a in aux], aux_params=_params(aux_heads),
        cls_head=_linear_chain(probe.cls_head), cls_head_params=_params(probe.cls_head),
        total_params=_params(probe), gflops=counter.get_total_flops() / 1e9,
        seg_stride=image_size // int(head_input[0][-1]), stem_level_params=_params(getattr(probe, "stem_level", None)))


class _Diagram:
    """Boxes (centre x, y, width, height in data units) and arrows between their edges on one axis."""

    def __init__(self, ax) -> None:
        self.ax = ax

    def box(self, x: float, y: float, w: float, h: float, title: str, body: str = "", colour: str = "#dbe9f6",
            dashed: bool = False, title_size: float = 10.5, body_size: float = 8.5) -> tuple:
        patch = FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.15",
                               facecolor=colour, edgecolor="#37474f", linewidth=1.3,
                               linestyle="--" if dashed else "-", zorder=2)
        self.ax.add_patch(patch)
        if body:
            self.ax.text(x, y + h / 2 - 0.16, title, ha="center", va="top", fontsize=title_size,
                         fontweight="bold", zorder=3)
            self.ax.text(x, y - 0.12, body, ha="center", va="center", fontsize=body_size, zorder=3,
                         linespacing=1.25)
        else:
            self.ax.text(x, y, title, ha="center", va="center", fontsize=title_size, fontweight="bold", zorder=3)
        return (x, y, w, h)

    def group(self, x0: float, x1: float, y0: float, y1: float, label: str, colour: str) -> None:
        self.ax.add_patch(FancyBboxPatch((x0, y0), x1 - x0, y1 - y0, boxstyle="round,pad=0.02,rounding_size=0.25",
                                         facecolor=colour, edgecolor="none", alpha=0.55, zorder=0))
        self.ax.text(x0 + 0.15, y1 - 0.12, label, ha="left", va="top", fontsize=9, style="italic",
                     color="#37474f", zorder=1)

    @staticmethod
    def edge(box: tuple, side: str) -> tuple[float, float]:
        x, y, w, h = box
        return {"left": (x - w / 2, y), "right": (x + w / 2, y), "top": (x, y + h / 2),
                "bottom": (x, y - h / 2)}[side]

    def arrow(self, start: tuple[float, float], end: tuple[float, float], label: str = "", dashed: bool = False,
              label_offset: tuple[float, float] = (0.0, 0.18)) -> None:
        self.ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, linewidth=1.4,
                                          color="#37474f", linestyle="--" if dashed else "-", zorder=1,
                                          shrinkA=0, shrinkB=0))
        if label:
            mx, my = (start[0] + end[0]) / 2 + label_offset[0], (start[1] + end[1]) / 2 + label_offset[1]
            self.ax.text(mx, my, label, ha="center", va="bottom", fontsize=8, color="#37474f", zorder=3,
                         bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5, "alpha": 0.8})


def draw_architecture(out_path: PathLike = "images/architecture.png", model: Optional[nn.Module] = None,
                      image_size: int = 256) -> Path:
    """A block diagram of EfficientMTNet whose channels, strides, blocks and parameter counts are read from the
    model (the default-configured one when `model` is None). Returns the PNG path."""
    info = describe_architecture(model, image_size)
    if len(info.stages) < 2 or len(info.decoder_strides) < 2:
        raise ValueError("draw_architecture expects a stem, encoder stages and a multi-level decoder")
    fig = new_figure(18.5, 10.5, layout=None)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 19.9)
    ax.set_ylim(0, 11.2)
    ax.axis("off")
    d = _Diagram(ax)
    enc_c, ctx_c, dec_c, head_c, io_c = "#dbe9f6", "#fde4c8", "#dff2df", "#f3dcef", "#eeeeee"

    # Row 1: input, stem and stages, Hamburger.
    y_enc, w, h, step = 7.7, 2.4, 1.5, 2.7
    xs = [1.45 + step * k for k in range(len(info.stages) + 2)]
    d.group(0.1, xs[len(info.stages)] + w / 2 + 0.15, y_enc - h / 2 - 0.25, y_enc + h / 2 + 0.55,
            f"encoder (MobileNetV2 inverted residuals): {_fmt_params(sum(s.params for s in info.stages))} params",
            "#eef4fb")
    boxes = [d.box(xs[0], y_enc, w - 0.4, h, "input", f"{info.in_channels} × H × W\n(e.g. {info.image_size}×"
                   f"{info.image_size})", io_c)]
    for k, stage in enumerate(info.stages):
        body = f"{stage.detail}\n{stage.channels} ch, 1/{stage.stride}\n{_fmt_params(stage.params)} params"
        boxes.append(d.box(xs[k + 1], y_enc, w, h, stage.name, body, enc_c))
    for a, b in zip(boxes, boxes[1:]):
        d.arrow(d.edge(a, "right"), d.edge(b, "left"))
    ham = d.box(xs[-1] + 0.4, y_enc, 3.2, 1.9, "Hamburger (NMF)", info.context + f"\n{_fmt_params(info.context_params)}"
                " params", ctx_c, body_size=8)
    d.arrow(d.edge(boxes[-1], "right"), d.edge(ham, "left"))

    # Row 0: classification head on the pooled Hamburger features.
    y_cls = 10.2
    cls = d.box(ham[0] - 1.2, y_cls, 4.2, 1.25, "classification head",
                info.cls_head + f", {_fmt_params(info.cls_head_params)} params", head_c, body_size=8)
    logits = d.box(cls[0] - 4.9, y_cls, 2.8, 0.9, f"class logits\nB × {info.num_classes}", colour=io_c,
                   title_size=9.5)
    d.arrow((ham[0], ham[1] + ham[3] / 2), (ham[0], cls[1] - cls[3] / 2))
    d.arrow(d.edge(cls, "left"), d.edge(logits, "right"))

    # Row 2: FPN levels, finest first; laterals from the stages that feed the decoder (deepest from Hamburger).
    y_fpn = 4.55
    strides = info.decoder_strides
    feeding = [k for k, s in enumerate(info.stages) if s.stride in strides]
    level_boxes = {}
    for stride in strides:
        k = next(i for i in feeding if info.stages[i].stride == stride)
        level_boxes[stride] = d.box(xs[k + 1], y_fpn, w, 1.15, f"level 1/{stride}",
                                    f"lateral 1×1 → {info.decoder_channels} ch", dec_c, body_size=8.5)
    deepest = max(strides)
    for stride, level in level_boxes.items():
        source = ham if stride == deepest else boxes[1 + next(i for i in feeding if info.stages[i].stride == stride)]
        if stride == deepest:
            d.arrow((ham[0] - 0.6, ham[1] - ham[3] / 2), d.edge(level, "right"))
        else:
            d.arrow(d.edge(source, "bottom"), d.edge(level, "top"))
    ordered = sorted(level_boxes)
    for coarse, fine in zip(ordered[:0:-1], ordered[-2::-1]):
        d.arrow(d.edge(level_boxes[coarse], "left"), d.edge(level_boxes[fine], "right"))
    # The decoder's legend sits in the free space left of its finest level, away from the lateral arrows.
    d.group(0.1, level_boxes[ordered[-1]][0] + w / 2 + 0.15, y_fpn - 0.85, y_fpn + 0.85, "", "#eef8ee")
    ax.text(xs[0] + 0.9, y_fpn, f"FPN decoder\n{_fmt_params(info.decoder_params)} params\n\ntop-down (←):\n"
            f"upsample ×2, add the\nlateral, depthwise-separable\n3×3 smoothing", ha="center", va="center",
            fontsize=9, color="#37474f", style="italic", zorder=3)

    # Row 3: segmentation head on the finest level; auxiliary heads (training only) on deeper ones.
    y_head = 1.75
    finest = level_boxes[ordered[0]]
    reads = "" if info.seg_stride == ordered[0] else (
        f"\nreads a 1/{info.seg_stride} level: stem lateral\n+ 1/{ordered[0]} upsampled, DW-sep 3×3 "
        f"({_fmt_params(info.stem_level_params)})")
    seg = d.box(finest[0], y_head, w, 1.5 if not reads else 1.9, "segmentation head",
                f"{info.seg_head}\n{_fmt_params(info.seg_head_params)} params{reads}", head_c, body_size=8)
    mask = d.box(seg[0] - 4.1, y_head, 3.0, 1.0, "mask logits\nB × 1 × H × W", colour=io_c, title_size=9.5)
    d.arrow(d.edge(finest, "bottom"), d.edge(seg, "top"))
    d.arrow(d.edge(seg, "left"), d.edge(mask, "right"), f"bilinear ×{info.seg_stride}", label_offset=(0, 0.1))
    for stride in info.aux_strides:
        if stride not in level_boxes:
            continue
        level = level_boxes[stride]
        aux = d.box(level[0], y_head, w, 1.1, f"aux head 1/{stride}", "1×1 → 1 (training only)", "#fafafa",
                    dashed=True, title_size=9.5, body_size=8)
        d.arrow(d.edge(level, "bottom"), d.edge(aux, "top"), dashed=True)
    if info.aux_strides:
        ax.text(level_boxes[max(info.aux_strides)][0] + w / 2 + 0.3, y_head,
                f"deep supervision:\n{_fmt_params(info.aux_params)} params,\ndropped at inference",
                ha="left", va="center", fontsize=8.5, style="italic", color="#37474f")

    inference = info.total_params - info.aux_params
    ax.text(9.95, 0.2, f"EfficientMTNet: {_fmt_params(inference)} parameters at inference "
            f"({_fmt_params(info.total_params)} with the auxiliary heads), {info.gflops:.2f} GFLOPs at "
            f"{info.image_size}×{info.image_size} (torch FlopCounterMode).\nDrawn by "
            f"`python -m visualization architecture` from the built model.",
            ha="center", va="bottom", fontsize=9.5, color="#455a64")
    return save_figure(fig, out_path)


