"""Image-quality metrics of reconstructions against the real images: rFID and KID on InceptionV3 pool
features (KID by torch-fidelity; the Frechet distance by an exact identity, faster than torch-fidelity's) and
LPIPS (the project's LPIPS-VGG16, only with genuine weights). SSIM lives in bench.metrics.

A metric that cannot be computed honestly is None with a reason, never a number from other weights.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor
from torch_fidelity.metric_kid import kid_features_to_metric, KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD

from bench import UserError
from bench.inception import (
    FidExtractor,
    default_cache_dir,
    find_inception_weights,
    inception_features,
    load_extractor,
)
from bench.models.perceptual import LPIPS

KID_SUBSETS = 100  # torch-fidelity's default
KID_SEED = 2020  # torch-fidelity's default rng_seed: subsets drawn reproducibly


# --- FID and KID on features -----------------------------------------------------------------------------


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """FID of features (N_a, D) and (N_b, D): |mu_a - mu_b|^2 + tr S_a + tr S_b - 2 tr (S_a S_b)^(1/2).

    torch-fidelity takes tr (S_a S_b)^(1/2) as the sum of sqrt(eig(S_a S_b)): a non-symmetric 2048x2048
    eigenproblem, slow to converge on the rank-deficient covariances of fewer than 2048 images (4-30 s on a
    loaded 2-core CPU, for 48 or 1000 images). For any factors S = F F^T the eigenvalues of S_a S_b are the
    squared singular values of F_a^T F_b, so the same trace is the nuclear norm of that matrix: exact, one SVD
    at most min(N, D) square (0.01-0.6 s side by side). Equal to torch-fidelity's within 2e-6 relative on
    real Inception features; the tests check it against torch-fidelity's and scipy's sqrtm.
    """
    factor_a, factor_b = _covariance_factor(features_a), _covariance_factor(features_b)  # (D, r_a), (D, r_b)
    mean_gap = features_a.detach().cpu().double().mean(0) - features_b.detach().cpu().double().mean(0)  # (D,)
    trace_root = torch.linalg.svdvals(factor_a.T @ factor_b).sum()  # (r_a, r_b) -> nuclear norm
    distance = mean_gap @ mean_gap + factor_a.square().sum() + factor_b.square().sum() - 2 * trace_root
    return float(distance)


def _covariance_factor(features: Tensor) -> Tensor:
    """F (D, r) with F F^T = the unbiased covariance of features (N, D), r = min(N, D): the cheaper exact factor."""
    x = features.detach().cpu().double()
    n, d = x.shape
    centered = x - x.mean(0)  # (N, D)
    if n <= d:
        return centered.T / math.sqrt(n - 1)  # (D, N)
    eigenvalues, eigenvectors = torch.linalg.eigh(centered.T @ centered / (n - 1))  # (D,), (D, D)
    return eigenvectors * eigenvalues.clamp_min(0).sqrt()  # rounding can leave tiny negative eigenvalues


def kernel_inception_distance(
    features_a: Tensor, features_b: Tensor, *, subset_size: int, subsets: int = KID_SUBSETS, seed: int = KID_SEED
) -> tuple[float, float]:
    """KID mean and std over `subsets` random subsets (polynomial kernel, torch-fidelity's computation)."""
    out = kid_features_to_metric(
        features_a.float(), features_b.float(),
        kid_subset_size=subset_size, kid_subsets=subsets, rng_seed=seed, verbose=False,
    )
    return float(out[KEY_METRIC_KID_MEAN]), float(out[KEY_METRIC_KID_STD])


# --- reference (real-set) features, cached on disk ---------------------------------------------------------


def images_fingerprint(images: Tensor) -> str:
    """sha256 of the images' shape and bytes: detects a cache entry made from other images under the same key."""
    digest = hashlib.sha256(str(tuple(images.shape)).encode())
    digest.update(images.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def reference_cache_path(cache_dir: Path, reference_key: str, images: int, weights_sha256: str) -> Path:
    """One file per (reference key, image count, weights): readable name plus a hash so keys never collide."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", reference_key).strip("_")[:80]
    key_hash = hashlib.sha256(reference_key.encode()).hexdigest()[:8]
    return cache_dir / "fid-reference" / f"{slug}-{key_hash}-n{images}-w{weights_sha256[:12]}.pt"


def reference_features(
    real: Tensor,
    reference_key: str | None,
    extractor: FidExtractor,
    *,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
) -> tuple[Tensor, bool]:
    """Features (N, 2048) of the real set and whether they came from the cache.

    Cached per (reference_key, N, weights checksum); reference_key None disables the cache.
    """
    if reference_key is None:
        return inception_features(extractor, real.split(batch_size)), False
    path = reference_cache_path(Path(cache_dir) if cache_dir else default_cache_dir(), reference_key, len(real),
                                extractor.weights_sha256)
    fingerprint = images_fingerprint(real)
    if path.is_file():
        entry = torch.load(path, weights_only=True)
        if entry["images_sha256"] == fingerprint:
            return entry["features"], True
        warnings.warn(f"FID reference cache {path} holds other images under key {reference_key!r}; recomputing")
    features = inception_features(extractor, real.split(batch_size))
    entry = {"reference_key": reference_key, "images": len(real), "images_sha256": fingerprint,
             "weights_sha256": extractor.weights_sha256, "features": features}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    torch.save(entry, partial)
    os.replace(partial, path)  # several runs of one grid may share a reference; each sees a whole file
    return features, False


# --- the evaluation entry point ---------------------------------------------------------------------------


def fid_metrics(
    real: Tensor,
    fake: Tensor,
    *,
    reference_key: str | None,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    weights_path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    kid_subset_size: int = 1000,
    kid_subsets: int = KID_SUBSETS,
    allow_download: bool = False,
    extractor: FidExtractor | None = None,
) -> tuple[dict, dict, dict]:
    """rFID and KID of `fake` (M, 3, H, W) uint8 against `real` (N, 3, H, W) uint8 (see bench.metrics.to_uint8).

    Returns (metrics {'rfid', 'kid', 'kid_std'}: float or None, null_reasons {metric: why}, info: images,
    weights checksum and source, whether the reference features came from the cache, seconds).
    `device` is where the network loaded here runs; `extractor` (already on its device) overrides the weights
    lookup (tests inject `bench.inception.random_extractor()`). Images may live on the CPU: they travel in
    batches, as uint8.
    An explicit weights path that does not exist raises bench.UserError.
    """
    _check_images("real", real)
    _check_images("fake", fake)
    start = time.perf_counter()
    metrics = {"rfid": None, "kid": None, "kid_std": None}
    info = {"fid_images": len(fake), "fid_reference_images": len(real), "fid_weights_sha256": None,
            "fid_weights_source": None, "reference_key": reference_key, "reference_cached": False}
    if min(len(real), len(fake)) < 2:  # a covariance needs two samples; KID subsets need two
        why = f"needs at least 2 images per set, got {len(real)} real and {len(fake)} reconstructed"
        return metrics, dict.fromkeys(metrics, why), info
    if extractor is None:
        weights, why = find_inception_weights(weights_path, cache_dir=cache_dir, allow_download=allow_download)
        if weights is None:
            return metrics, dict.fromkeys(metrics, why), info
        extractor = load_extractor(weights, device)
    info["fid_weights_sha256"] = extractor.weights_sha256
    info["fid_weights_source"] = extractor.weights_source

    t = time.perf_counter()
    real_features, info["reference_cached"] = reference_features(
        real, reference_key, extractor, cache_dir=cache_dir, batch_size=batch_size)
    info["fid_reference_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    fake_features = inception_features(extractor, fake.split(batch_size))
    info["fid_feature_seconds"] = time.perf_counter() - t

    metrics["rfid"] = frechet_distance(real_features, fake_features)
    subset = min(kid_subset_size, len(real), len(fake))  # subsets are drawn without replacement
    metrics["kid"], metrics["kid_std"] = kernel_inception_distance(
        real_features, fake_features, subset_size=subset, subsets=kid_subsets)
    info.update(kid_subset_size=subset, kid_subsets=kid_subsets, fid_seconds=time.perf_counter() - start)
    return metrics, {}, info


def _check_images(name: str, images: Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} images must be uint8 (N, 3, H, W) in [0, 255] (see bench.metrics.to_uint8), "
                         f"got {images.dtype} {tuple(images.shape)}")


# --- LPIPS ------------------------------------------------------------------------------------------------


def lpips_metric(
    real: Tensor,
    fake: Tensor,
    *,
    vgg_path: str | os.PathLike | None = None,
    network: LPIPS | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> tuple[float | None, str | None]:
    """Mean LPIPS-VGG16 over image pairs, float (N, 3, H, W) in [0, 1], or (None, why).

    The project's LPIPS (bench.models.perceptual, the VQGAN loss's) with the same weights lookup: VGG16 from
    `vgg_path` (missing file: UserError) or torch hub's cache (missing: None), never downloaded here.
    `network` injects one (tests: LPIPS.random()).
    """
    _check_pairs(real, fake)
    if network is None and vgg_path is not None:
        network = LPIPS.from_files(vgg_path, None, download=False)  # a path that is not a file: UserError
    elif network is None:
        try:
            network = LPIPS.from_files(None, None, download=False)
        except UserError:  # nothing in torch hub's cache: a reason, the rest of the record stands
            return None, ("LPIPS needs ImageNet VGG16 weights (torchvision's vgg16-397923af.pth in torch hub's "
                          "checkpoint cache) and none were found offline")
    network = network.to(device)
    total = 0.0
    with torch.inference_mode():
        for real_batch, fake_batch in zip(real.split(batch_size), fake.split(batch_size)):
            real_batch, fake_batch = (b.to(device).float().clamp(0, 1) * 2 - 1 for b in (real_batch, fake_batch))
            total += float(network(fake_batch, real_batch).double().sum())  # (B,) distances
    return total / len(real), None


def _check_pairs(real: Tensor, fake: Tensor) -> None:
    # pairs are compared image by image; a length mismatch would silently drop images
    if real.shape != fake.shape:
        raise ValueError(f"real and reconstructed images differ in shape: {tuple(real.shape)} vs {tuple(fake.shape)}")
