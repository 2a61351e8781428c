"""The block's algebra, once: per-(n,c) moments -> the fold coefficients (docs/design.md section 2).

Everything here is O(N*C) arithmetic in PyTorch ops, differentiable by autograd, and shared by
every fused backend: the `torch` backend calls it directly, the kernel backends call it between
their statistics kernel and their MLP kernel (or mirror it in a kernel whose test compares
against it). Shapes: `mean`, `var` are (N, C); per-channel parameters are (C,); per-sample
drop-path factors are (N,).

With one-group GroupNorm the block is, per sample n and channel c,

    y   = a_c x + b_c                      (norm1, affine mixer, layer scale 1, residual)
    z   = A_c x + B_c                      (norm2 of y)
    out = a_c x + b_c + l2_c (W2 GELU(W1 z + b1) + b2)

and a, b, A, B follow from the channel moments of x alone.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics run in fp32 for fp32/fp16/bf16 inputs and in fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def channel_moments(x: torch.Tensor):
    """Per-(n,c) mean and population variance over H*W, in `stats_dtype`.

    torch.var_mean is a Welford/two-pass reduction, so large offsets do not cancel the way
    E[x^2] - E[x]^2 would.
    """
    xs = x.to(stats_dtype(x.dtype))
    if x.shape[0] == 0:
        # An empty batch has no statistics to compute (var_mean would warn about its zero
        # degrees of freedom); shapes only, so the empty-batch path stays shape-polymorphic.
        empty = xs.new_empty(x.shape[:2])
        return empty, empty.clone()
    var, mean = torch.var_mean(xs, dim=(2, 3), unbiased=False)
    return mean, var


def merge_moments(count: torch.Tensor | int, means: torch.Tensor, m2s: torch.Tensor, dim: int):
    """Chan's merge of equal-or-unequal-count partial moments along `dim`, in a fixed order.

    `count` is the number of values behind each partial (an int when all are equal, else a tensor
    broadcastable to `means`). Returns (mean, population variance). Used to merge the per-tile
    partial moments that a kernel writes (chained statistics) deterministically.
    """
    # Never a tensor built from host data: on a GPU that is a blocking copy (and it breaks
    # CUDA-graph capture); an int becomes a device-side fill.
    if isinstance(count, torch.Tensor):
        counts = count.to(means.dtype).expand_as(means)
    else:
        counts = means.new_full(means.shape, float(count))
    total = counts.sum(dim)
    mean = (counts * means).sum(dim) / total
    # Deviations of each partial mean from the merged mean carry the between-tile variance.
    m2 = m2s.sum(dim) + (counts * (means - mean.unsqueeze(dim)) ** 2).sum(dim)
    return mean, m2 / total


def group_statistics(mean, var, eps: float):
    """(mu, r) of a one-group GroupNorm from per-(n,c) channel moments, each (N, 1): the
    sample mean over all C*T values and 1/sqrt(variance + eps), the variance by the law of
    total variance (mean within-channel variance plus the spread of the channel means)."""
    mu = mean.mean(1, keepdim=True)
    total = var.mean(1, keepdim=True) + ((mean - mu) ** 2).mean(1, keepdim=True)
    return mu, torch.rsqrt(total + eps)


def group_norm_map(mu, r, weight, bias):
    """A one-group GroupNorm with per-channel `weight`, `bias` (C,) as the per-(n,c) affine map
    GN(x) = scale x + shift, given its statistics (mu, r) from `group_statistics`. Returns
    (scale, shift), each (N, C)."""
    scale = weight.unsqueeze(0) * r
    return scale, bias.unsqueeze(0) - scale * mu


class FoldCoefficients(NamedTuple):
    """Per-(n,c) coefficients of the folded block and the statistics the backward needs."""
    a: torch.Tensor      # (N, C)  y = a x + b
    b: torch.Tensor      # (N, C)
    A: torch.Tensor      # (N, C)  z = A x + B
    B: torch.Tensor      # (N, C)
    mu1: torch.Tensor    # (N, 1)  norm1 mean
    r1: torch.Tensor     # (N, 1)  norm1 1/sqrt(var + eps)
    ybar: torch.Tensor   # (N, C)  channel means of y
    mu2: torch.Tensor    # (N, 1)  norm2 mean
    r2: torch.Tensor     # (N, 1)  norm2 1/sqrt(var + eps)


def fold_coefficients(mean, var, s, t, l1, g2, beta2, eps1: float, eps2: float) -> FoldCoefficients:
    """Fold norm1 + mixer + layer scale 1 + residual + norm2 into per-(n,c) affine maps.

    `s`, `t` (C,) are the scale and shift of the single GroupNorm equal to norm1 followed by the
    affine mixer (deploy form: `norm_reparam`); `l1` (N, C) is layer_scale_1 times the sample's
    drop-path factor. Variances are combined by the law of total variance (mean of within-channel
    variances plus variance of channel means), which has no E[x^2] - E[x]^2 cancellation.
    """
    sd = mean.dtype
    s, t, g2, beta2 = (p.to(sd) for p in (s, t, g2, beta2))
    l1 = l1.to(sd)

    mu1, r1 = group_statistics(mean, var, eps1)
    a = 1 + l1 * s * r1
    b = l1 * (t - s * mu1 * r1)

    ybar = a * mean + b
    mu2, r2 = group_statistics(ybar, a * a * var, eps2)
    A = a * r2 * g2
    B = (b - mu2) * r2 * g2 + beta2
    return FoldCoefficients(a, b, A, B, mu1, r1, ybar, mu2, r2)


def per_sample_scale(layer_scale: torch.Tensor, factors: torch.Tensor | None, n: int, dtype):
    """layer_scale (C,) times the per-sample drop-path factors (N,) -> (N, C) in `dtype`."""
    ls = layer_scale.to(dtype).unsqueeze(0)
    if factors is None:
        return ls.expand(n, -1)
    return ls * factors.to(dtype).unsqueeze(1)


class BackwardCoefficients(NamedTuple):
    """Parameter gradients of the folded O(C) part and the per-(n,c) dx coefficients."""
    P: torch.Tensor       # (N, C) dx = P g + Q dz + R (x - m) + S
    Q: torch.Tensor
    R: torch.Tensor
    S: torch.Tensor
    d_l1: torch.Tensor    # (N, C) gradient w.r.t. the per-sample l1 (sum over n -> d ls1 after dp)
    d_l2: torch.Tensor    # (N, C)
    d_s: torch.Tensor     # (C,)
    d_t: torch.Tensor     # (C,)
    d_g2: torch.Tensor    # (C,)
    d_beta2: torch.Tensor  # (C,)


def backward_coefficients(sums: torch.Tensor, mean, var, coeffs: FoldCoefficients, s, t, l1,
                          g2, hw: int) -> BackwardCoefficients:
    """docs/design.md section 3: from the per-(n,c) sums of the MLP backward to every gradient
    but the MLP's.

    `sums` is (5, N, C): sum_t g, sum_t g (x - m), sum_t dz, sum_t dz (x - m), sum_t g o, where g
    is dL/dout, dz = dL/dz from the MLP, o = fc2 output (before layer scale). `l1` is (N, C).
    `d_l1`/`d_l2` are per (n, c); the caller multiplies by the drop-path factors and sums over n
    to get the layer-scale gradients (in the pipeline, autograd of `fold.per_sample_scale` does
    it). d_l2 is SGo itself: out depends on l2 only through l2 o.
    """
    sd = mean.dtype
    s, t, g2, l1 = (p.to(sd) for p in (s, t, g2, l1))
    SG, SGx, Sdz, Sdzx, SGo = sums.to(sd).unbind(0)
    a, _, _, _, mu1, r1, ybar, mu2, r2 = coeffs
    C = mean.shape[1]
    M = C * hw

    Sdzyh = r2 * (a * Sdzx + (ybar - mu2) * Sdz)          # sum_t dz * yhat
    d_g2 = Sdzyh.sum(0)
    d_beta2 = Sdz.sum(0)
    K1 = (g2 * Sdz).sum(1, keepdim=True) / M
    K2 = (g2 * Sdzyh).sum(1, keepdim=True) / M
    alpha = r2 * g2
    beta = -r2 * r2 * K2 * a
    gamma = -r2 * K1 - r2 * r2 * K2 * (ybar - mu2)
    # dy = g + alpha dz + beta (x - m) + gamma: the gradient reaching y.
    Sdy = SG + alpha * Sdz + gamma * hw
    Sdyx = SGx + alpha * Sdzx + beta * hw * var
    Sdyxh = r1 * (Sdyx + (mean - mu1) * Sdy)                 # sum_t dy * xhat1
    d_l1 = s * Sdyxh + t * Sdy
    d_s = (l1 * Sdyxh).sum(0)
    d_t = (l1 * Sdy).sum(0)
    kappa = l1 * s
    K3 = (kappa * Sdy).sum(1, keepdim=True) / M
    K4 = (kappa * Sdyxh).sum(1, keepdim=True) / M
    P = 1 + r1 * kappa
    Q = P * alpha
    R = P * beta - r1 * r1 * K4
    S = P * gamma - r1 * K3 - r1 * r1 * K4 * (mean - mu1)
    return BackwardCoefficients(P, Q, R, S, d_l1, SGo, d_s, d_t, d_g2, d_beta2)
