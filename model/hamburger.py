"""Hamburger global-context module (Geng et al., ICLR 2021, "Is Attention Better Than Matrix Decomposition?").

lower bread (1x1 conv + ReLU) -> ham: non-negative matrix factorisation of the (channels x pixels) feature
matrix -> upper bread (1x1 conv + BN) -> residual. The ham replaces each pixel's feature vector by its
reconstruction from R bases shared by the whole image, a low-rank global context whose cost grows linearly
with the pixel count (attention grows with its square).

NMF uses Lee & Seung's multiplicative updates for the Frobenius norm, which keep both factors non-negative
and never increase the reconstruction error. As in the paper, the iterations run without autograd and only
one last coefficient update is differentiated (the "one-step gradient"): back-propagating through every
iteration is slower and, per the paper, trains worse.

For ablations the ham can be swapped while the breads stay: `ham="none"` keeps the two 1x1 projections with
nothing between them (what the decomposition adds beyond a residual bottleneck), `ham="attention"` puts
softmax self-attention among the pixels in its place (`SelfAttention2D`, the paper's comparison).
"""
from __future__ import annotations

import contextlib
from typing import Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import ConvBNAct

NMFResult = Union[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, list[float]]]


def _update_coef(x: torch.Tensor, bases: torch.Tensor, coef: torch.Tensor, eps: float) -> torch.Tensor:
    """One multiplicative update of C in X ~ B C^T: C <- C * (X^T B) / (C B^T B)."""
    numerator = torch.bmm(x.transpose(1, 2), bases)
    denominator = torch.bmm(coef, torch.bmm(bases.transpose(1, 2), bases))
    return coef * numerator / (denominator + eps)


def _update_bases(x: torch.Tensor, bases: torch.Tensor, coef: torch.Tensor, eps: float) -> torch.Tensor:
    """One multiplicative update of B in X ~ B C^T: B <- B * (X C) / (B C^T C)."""
    numerator = torch.bmm(x, coef)
    denominator = torch.bmm(bases, torch.bmm(coef.transpose(1, 2), coef))
    return bases * numerator / (denominator + eps)


def _relative_error(x: torch.Tensor, bases: torch.Tensor, coef: torch.Tensor) -> float:
    """||X - B C^T||_F / ||X||_F over the whole batch."""
    residual = x - torch.bmm(bases, coef.transpose(1, 2))
    return float(residual.norm() / x.norm().clamp_min(1e-12))


def nmf(x: torch.Tensor, bases: torch.Tensor, steps: int, inv_t: float = 1.0, eps: float = 1e-6,
        return_errors: bool = False) -> NMFResult:
    """Factorise non-negative `x` (B, D, N) as `bases` (B, D, R) @ `coef`^T, `coef` (B, N, R).

    `bases` is the non-negative initialisation. The coefficients start as a softmax over the R bases of each
    pixel's similarity to them (temperature 1 / inv_t). `steps` alternating multiplicative updates run under
    `torch.no_grad()`; a final coefficient update is differentiable with respect to `x` (one-step gradient).
    With `return_errors`, also returns the relative reconstruction error after the initialisation, after each
    step and after the final coefficient update (steps + 2 values), for inspection and tests.
    """
    if x.dim() != 3 or bases.dim() != 3:
        raise ValueError(f"nmf expects x (B, D, N) and bases (B, D, R); got {tuple(x.shape)} and {tuple(bases.shape)}")
    errors: list[float] = []
    with torch.no_grad():
        coef = F.softmax(inv_t * torch.bmm(x.transpose(1, 2), bases), dim=-1)
        if return_errors:
            errors.append(_relative_error(x, bases, coef))
        for _ in range(steps):
            coef = _update_coef(x, bases, coef, eps)
            bases = _update_bases(x, bases, coef, eps)
            if return_errors:
                errors.append(_relative_error(x, bases, coef))
    coef = _update_coef(x, bases, coef, eps)
    if return_errors:
        errors.append(_relative_error(x.detach(), bases, coef.detach()))
        return bases, coef, errors
    return bases, coef


def random_bases(batch: int, dim: int, rank: int, device: torch.device | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform random non-negative bases (batch, dim, rank), each basis L2-normalised."""
    bases = torch.rand(batch, dim, rank, device=device, generator=generator)
    return F.normalize(bases, dim=1)


class NMF2D(nn.Module):
    """The ham: NMF of a non-negative (B, C, H, W) map, returned as its rank-R reconstruction (same shape).

    Training draws fresh random bases every forward (as in the paper and mmsegmentation), which regularises;
    evaluation starts from a fixed set of bases drawn once at construction (a buffer, saved in the state_dict),
    so that inference is deterministic. The decomposition always runs in float32, outside autocast: the
    multiplicative updates divide by small sums that under- or overflow in float16.
    """

    def __init__(self, channels: int, rank: int = 16, train_steps: int = 6, eval_steps: int = 7,
                 inv_t: float = 1.0, random_train_bases: bool = True, eps: float = 1e-6, seed: int = 0) -> None:
        super().__init__()
        if rank < 1 or train_steps < 0 or eval_steps < 0:
            raise ValueError(f"NMF2D needs rank >= 1 and steps >= 0; got rank={rank}, "
                             f"train_steps={train_steps}, eval_steps={eval_steps}")
        self.rank = rank
        self.train_steps = train_steps
        self.eval_steps = eval_steps
        self.inv_t = inv_t
        self.random_train_bases = random_train_bases
        self.eps = eps
        generator = torch.Generator().manual_seed(seed)  # a private generator: global RNG state is untouched
        self.register_buffer("bases", random_bases(1, channels, rank, generator=generator))

    def matmul_macs(self, input_shape: torch.Size) -> int:
        """Multiply-accumulates of the decomposition's matrix products (FLOP counters cannot see them)."""
        from utils.flops import nmf_macs

        b, c, h, w = input_shape
        return nmf_macs(c, h * w, self.rank, self.train_steps if self.training else self.eval_steps, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        in_dtype = x.dtype
        no_autocast = (torch.autocast(x.device.type, enabled=False) if torch.is_autocast_enabled(x.device.type)
                       else contextlib.nullcontext())
        with no_autocast:
            flat = x.float().reshape(b, c, h * w)
            if self.training and self.random_train_bases:
                bases = random_bases(b, c, self.rank, device=x.device)
            else:
                bases = self.bases.float().expand(b, -1, -1)
            steps = self.train_steps if self.training else self.eval_steps
            bases, coef = nmf(flat, bases, steps, self.inv_t, self.eps)
            recon = torch.bmm(bases, coef.transpose(1, 2))
        return recon.reshape(b, c, h, w).to(in_dtype)

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, train_steps={self.train_steps}, eval_steps={self.eval_steps}, "
                f"inv_t={self.inv_t}, random_train_bases={self.random_train_bases}")


class SelfAttention2D(nn.Module):
    """Multi-head softmax self-attention among the pixels of a (B, C, H, W) map (a non-local block's core).

    q, k, v are 1x1 projections of the input (C -> C each, split into `heads` heads of C / heads channels);
    every pixel attends to every pixel with weights softmax(q k^T / sqrt(C / heads)). The output has the
    input's shape. Its cost grows with the square of the pixel count (NMF's grows linearly).
    """

    def __init__(self, channels: int, heads: int = 1) -> None:
        super().__init__()
        if heads < 1 or channels % heads:
            raise ValueError(f"SelfAttention2D needs heads >= 1 dividing the {channels} channels, got heads={heads}")
        self.heads = heads
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)

    def matmul_macs(self, input_shape: torch.Size) -> int:
        """Multiply-accumulates of q k^T and the weighted sum of v (FLOP counters of modules cannot see them)."""
        from utils.flops import attention_macs

        b, c, h, w = input_shape
        return attention_macs(h * w, h * w, c, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # (B, 3C, H, W) -> three (B, heads, N, C / heads)
        q, k, v = self.qkv(x).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(-1, -2).reshape(b, c, h, w)

    def extra_repr(self) -> str:
        return f"heads={self.heads}"


HAMS = ("nmf", "none", "attention")


class Hamburger(nn.Module):
    """x + upper_bread(ham(lower_bread(x))): a global-context residual block whose output has the shape of x.

    `ham`: "nmf" (the matrix decomposition), "none" (identity: the breads alone) or "attention"
    (`SelfAttention2D` with `heads` heads on the ham_channels-wide map).
    """

    def __init__(self, channels: int, ham_channels: int = 64, rank: int = 16, train_steps: int = 6,
                 eval_steps: int = 7, inv_t: float = 1.0, random_train_bases: bool = True, seed: int = 0,
                 ham: str = "nmf", heads: int = 1) -> None:
        super().__init__()
        if ham not in HAMS:
            raise ValueError(f"Hamburger 'ham' must be one of {', '.join(HAMS)}; got {ham!r}")
        # The ReLU makes the matrix non-negative, which NMF requires.
        self.lower_bread = nn.Sequential(nn.Conv2d(channels, ham_channels, 1), nn.ReLU())
        if ham == "nmf":
            self.ham: nn.Module = NMF2D(ham_channels, rank, train_steps, eval_steps, inv_t, random_train_bases,
                                        seed=seed)
        elif ham == "attention":
            self.ham = SelfAttention2D(ham_channels, heads)
        else:
            self.ham = nn.Identity()
        self.upper_bread = ConvBNAct(ham_channels, channels, 1, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.upper_bread(self.ham(self.lower_bread(x)))
