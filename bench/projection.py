"""The codebook against the features it quantizes, in two dimensions: the data behind the report's "codebook
versus features" figure, computed once at the end of training and kept in the run's `<run_id>.samples.npz`
(keys prefixed "pca_").

`codebook_projection(model, images_uint8, histogram)` runs the encoder on a few test images (32 are plenty) and
returns, as numpy arrays:

- features  (N, 2) float16: the encoder's outputs, one row per latent position (N = images x h x w), projected
            on the first two principal components of those rows. Where the quantizer has a `pre` module (the
            LayerNorm of `ste-ln`, `mq` and `mq-alt`, over the channels), the rows are what leaves it, i.e. what
            the nearest-code search receives; otherwise the encoder output z itself.
- codes     (K, 2) float16: the vector the decoder receives for each code 0..K-1 (`quantizer.decode_indices` on
            every index), projected into the same two components. For a method with several codes per position
            (code_depth > 1, `rvq`) the first level's codebook, `export_codebook()[0]`: the codes the encoder
            output itself is searched against (the decoder sees their sum with the later levels' codes).
- used      (K,) bool: whether the code occurs in `histogram` (the test split's code histogram, env.code_histogram;
            its first row for a (D, K) histogram).
- explained (2,) float32: the fraction of the rows' total variance along each of the two components.
- mean      (C,) float32 and components (2, C) float32: the PCA itself (C channels), so the projection can be
            redone or checked.
- note      a 0-d unicode array: what the rows and codes are for this quantizer, in words.

The PCA is exact and deterministic: the rows are centred by their mean and decomposed by an SVD in float64 on the
CPU (no random projection); each component's sign is fixed so that its largest-magnitude loading is positive.
float16 keeps the file small (a few kB for 32 images); values that float16 cannot hold are kept as float32.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

CHUNK = 4096  # codes decoded per call


def _feature_rows(model: nn.Module, images: Tensor) -> tuple[Tensor, str]:
    """(N, C) float64 rows of what the quantizer searches with, and which space that is, in words."""
    quantizer = model.quantizer
    z = model.encode(model.preprocess(images))
    pre = getattr(quantizer, "pre", None)
    if isinstance(pre, nn.Module) and not isinstance(pre, nn.Identity):
        z = pre(z)
        space = f"the encoder output after the quantizer's {type(pre).__name__} (what the code search receives)"
    else:
        space = "the encoder output z (what enters the quantizer)"
    rows = z.detach().double().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    return rows.cpu(), space


def _code_rows(quantizer: nn.Module, device: torch.device) -> tuple[Tensor, str]:
    """(K, C) float64: the vector the decoder receives for every code, and how they were obtained, in words."""
    depth = getattr(quantizer, "code_depth", 1)
    if depth > 1:
        codebooks = quantizer.export_codebook()
        if codebooks is None or codebooks.dim() != 3:
            raise ValueError(f"{type(quantizer).__name__} has code_depth {depth} but export_codebook() gives no "
                             "(depth, K, D) codebooks")
        return codebooks[0].detach().double().cpu(), (
            f"the first of {depth} levels' codebooks (export_codebook()[0]): the codes the encoder output is "
            "searched against; the decoder sees their sum with the later levels' codes")
    size = quantizer.codebook_size
    parts = []
    for start in range(0, size, CHUNK):
        index = torch.arange(start, min(start + CHUNK, size), device=device).view(-1, 1, 1)  # (n, 1, 1) = (B, H, W)
        decoded = quantizer.decode_indices(index)  # (n, C, 1, 1)
        parts.append(decoded.detach().double().reshape(len(index), -1).cpu())
    return torch.cat(parts), "decode_indices of every code 0..K-1: the vectors the decoder receives"


def pca(rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """rows (N, C) float64 -> (mean (C,), components (2, C), explained variance fractions (2,)). Exact SVD of the
    centred rows; signs fixed so that each component's largest-magnitude loading is positive."""
    mean = rows.mean(0)
    _, singular, vh = torch.linalg.svd(rows - mean, full_matrices=False)
    components = vh[:2].clone()
    if len(components) < 2:  # one channel: a second axis of zeros
        components = torch.cat([components, torch.zeros_like(components)])
    signs = torch.sign(components.gather(1, components.abs().argmax(1, keepdim=True))).squeeze(1)
    components *= torch.where(signs == 0, torch.ones_like(signs), signs).unsqueeze(1)
    variance = singular.pow(2)
    total = variance.sum()
    explained = (variance[:2] / total if total > 0 else torch.zeros(min(2, len(variance)), dtype=rows.dtype))
    explained = torch.cat([explained, explained.new_zeros(2 - len(explained))])
    return mean, components, explained


def _small(values: Tensor) -> np.ndarray:
    """float16 where every value fits, else float32."""
    array = values.numpy()
    return array.astype(np.float16) if np.abs(array).max(initial=0.0) < 6.0e4 else array.astype(np.float32)


@torch.no_grad()
def codebook_projection(model: nn.Module, images_uint8: Tensor, histogram) -> dict[str, np.ndarray]:
    """The encoder's features of `images_uint8` ((B, 3, H, W) uint8, a few test images) and the K codes, on the
    features' first two principal components; `histogram` is the test split's code histogram ((K,) or (D, K)
    counts, as env.code_histogram). The model is put in eval mode for the pass and left as it was."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(device.type, enabled=False):
            features, space = _feature_rows(model, images_uint8.to(device))
            codes, how = _code_rows(model.quantizer, device)
    finally:
        model.train(was_training)
    if codes.shape[1] != features.shape[1]:
        raise ValueError(f"codes have {codes.shape[1]} channels and features {features.shape[1]}")
    mean, components, explained = pca(features)
    counts = np.asarray(histogram, dtype=np.float64)
    counts = counts[0] if counts.ndim == 2 else counts
    if len(counts) != len(codes):
        raise ValueError(f"histogram has {len(counts)} codes, the quantizer {len(codes)}")
    return {
        "features": _small((features - mean) @ components.T),
        "codes": _small((codes - mean) @ components.T),
        "used": counts > 0,
        "explained": explained.numpy().astype(np.float32),
        "mean": mean.numpy().astype(np.float32),
        "components": components.numpy().astype(np.float32),
        "note": np.array(f"rows: {space}; codes: {how}"),
    }
