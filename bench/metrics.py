"""Reconstruction and codebook metrics over a whole split, in one pass, with one host sync at the end.

Codebook statistics come from ONE histogram of code indices over every latent position of the split:
perplexity = exp(entropy of that histogram), usage = fraction of the K codes hit at least once. An average
of per-batch perplexities is a different, smaller number and is never reported as `perplexity`.

A method with code_depth D > 1 (residual VQ: D codebooks of K codes, indices (B, H, W, D)) has a (D, K)
histogram. Its `perplexity`, `usage` and `dead_codes` count the K * D codebook vectors as one codebook (code k of
level i is its own vector): perplexity = exp(entropy of the (level, code) histogram), in [D, K * D] and equal to
D times the geometric mean of the levels' perplexities; usage = fraction of the K * D vectors used; dead_codes =
K * D - used. Each level i also gets `perplexity_level_i`, `usage_level_i` (fraction of its K) and
`dead_codes_level_i`, level 0 first (the coarsest).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch
from torch import Tensor


def codebook_stats(histogram: Tensor) -> dict[str, float]:
    """histogram: (K,) counts of each code -> perplexity, usage (fraction of K), dead_codes (count).

    A (D, K) histogram (D codes per position) -> the same three over all K * D codes, plus
    perplexity_level_i, usage_level_i and dead_codes_level_i of each level i."""
    if histogram.dim() == 2:
        per_level = {f"{name}_level_{i}": value for i, level in enumerate(histogram)
                     for name, value in codebook_stats(level).items()}
        return {**codebook_stats(histogram.flatten()), **per_level}
    counts = histogram.double()
    total = counts.sum()
    p = counts / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    used = int((counts > 0).sum())
    return {
        "perplexity": float(entropy.exp()),
        "usage": used / histogram.numel(),
        "dead_codes": histogram.numel() - used,
    }


def code_histogram(indices: Tensor, codebook_size: int) -> Tensor:
    """Counts of each code: indices (B, H, W) -> (K,) int64; (B, H, W, D) (D codes per position) -> (D, K)."""
    if indices.dim() <= 3:
        return torch.bincount(indices.flatten(), minlength=codebook_size)
    depth = indices.shape[-1]
    offsets = torch.arange(depth, device=indices.device) * codebook_size  # level i's codes -> [i*K, (i+1)*K)
    counts = torch.bincount((indices.reshape(-1, depth) + offsets).flatten(), minlength=codebook_size * depth)
    return counts.view(depth, codebook_size)


@dataclass
class SplitEvaluation:
    metrics: dict[str, float]
    histogram: Tensor  # (K,) int64 on the CPU; (D, K) for a method with D codes per position
    reconstructions: Tensor | None = None  # uint8 (N, 3, H, W) on the CPU, when asked for
    extra: dict = field(default_factory=dict)


def to_uint8(images: Tensor) -> Tensor:
    """Float images in [0, 1] (any shape) -> uint8 in [0, 255], clamped and rounded to nearest: what the FID
    network, the saved samples and the figures take."""
    return images.detach().clamp(0, 1).mul(255).round().to(torch.uint8)


@torch.no_grad()
def evaluate_split(
    model,
    images: Tensor,
    codebook_size: int,
    batch_size: int = 500,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
    keep_reconstructions: bool = False,
    ssim: bool = False,
    sharded: bool = False,
) -> SplitEvaluation:
    """Reconstruct every image of a uint8 split (N, 3, H, W) and measure it. The model is left as it was.

    sharded, under several ranks (in one process it changes nothing): every rank calls it on the same split and
    reconstructs only its contiguous slice (methods.collective.shard; uneven slices when N does not divide);
    the error sums, the SSIM state and the code histogram are all-reduced, so every rank returns the whole
    split's metrics (one process's, up to summation order), and the kept reconstructions are gathered to rank 0
    in split order (None on the other ranks).
    """
    from methods import collective  # imported here: importing bench.metrics alone loads no method

    was_training = model.training
    model.eval()
    device = images.device
    several = sharded and collective.distributed()
    rows = collective.shard(len(images)) if several else range(len(images))
    histogram = None  # (K,) or (D, K), shaped by the first batch's indices
    squared_error = torch.zeros((), dtype=torch.float64, device=device)
    psnr_sum = torch.zeros((), dtype=torch.float64, device=device)
    quant_error = torch.zeros((), dtype=torch.float64, device=device)
    reconstructions = []
    ssim_metric = None
    if ssim:
        from torchmetrics.image import StructuralSimilarityIndexMeasure

        # never torchmetrics' own gather at compute(): sharded slices are summed below with the other sums
        ssim_metric = StructuralSimilarityIndexMeasure(data_range=1.0, sync_on_compute=False).to(device)
    own_rank_only = collective.rank_local if several else contextlib.nullcontext  # no collective in a forward
    for start in range(rows.start, rows.stop, batch_size):
        batch = images[start:min(start + batch_size, rows.stop)]
        with autocast(), own_rank_only():
            recon, out = model(model.preprocess(batch))
        fake = model.postprocess(recon)  # float32 in [0, 1]
        real = batch.float() / 255.0
        per_image = (fake - real).pow(2).flatten(1).mean(1).double()  # (B,)
        squared_error += per_image.sum()
        psnr_sum += (10.0 * torch.log10(1.0 / per_image.clamp_min(1e-10))).sum()
        quant_error += out.quant_error.double() * len(batch)
        counts = code_histogram(out.indices, codebook_size)
        histogram = counts if histogram is None else histogram + counts
        if ssim_metric is not None:
            ssim_metric.update(fake, real)
        if keep_reconstructions:
            reconstructions.append(to_uint8(fake).cpu())
    model.train(was_training)
    if histogram is None:  # an empty split (or an empty slice of one)
        depth = getattr(getattr(model, "quantizer", None), "code_depth", 1)
        shape = (codebook_size,) if depth == 1 else (depth, codebook_size)
        histogram = torch.zeros(shape, dtype=torch.int64, device=device)
    if several:  # the ranks' slices -> the whole split: two all-reduces, no host sync
        sums = [squared_error, psnr_sum, quant_error]
        if ssim_metric is not None:
            sums += [ssim_metric.similarity.double(), ssim_metric.total.double()]
        sums = collective.all_reduce_sum_(torch.stack(sums))
        squared_error, psnr_sum, quant_error = sums[0], sums[1], sums[2]
        histogram = collective.all_reduce_sum_(histogram.contiguous())
    n = len(images)
    metrics = {
        "mse": float(squared_error) / n,
        "psnr": float(psnr_sum) / n,
        "quant_error": float(quant_error) / n,
        **codebook_stats(histogram.cpu()),
    }
    if ssim_metric is not None:  # torchmetrics' mean: the summed similarities over the image count
        metrics["ssim"] = float(sums[3] / sums[4]) if several else float(ssim_metric.compute())
    kept = None
    if keep_reconstructions:
        kept = (torch.cat(reconstructions) if reconstructions
                else torch.empty((0, *images.shape[1:]), dtype=torch.uint8))
        if several:  # rank 0: the whole split's, in order; the other ranks: None
            kept = collective.gather_rows_to_main(kept, collective.shard_sizes(len(images)), device)
    return SplitEvaluation(metrics, histogram.cpu(), kept)


def mean_batch_perplexity(indices: Tensor, codebook_size: int) -> float:
    """The per-batch figure shown in the progress bar; named as such, never stored as `perplexity`."""
    return codebook_stats(code_histogram(indices, codebook_size))["perplexity"]


PROTOCOL_METRICS = (
    "mse", "psnr", "ssim", "perplexity", "usage", "dead_codes", "quant_error",
    "rfid", "kid", "lpips", "gfid", "prior_bits_per_code",
)


def is_finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
