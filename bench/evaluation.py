"""The final evaluation of a run on the test split: every metric of the protocol, or null with its reason.

Reconstruction and codebook metrics come from one pass over the test split (bench.metrics); rFID and KID
compare the reconstructions with the test images through the standard FID Inception (bench.fid); LPIPS needs
ImageNet VGG16 weights; gFID trains the stage-2 prior (bench.prior), samples it and compares the samples with
the training split. Under several ranks the pass is sharded (each rank its slice of the test split, the sums
reduced and the reconstructions gathered to rank 0); rFID, KID, LPIPS and gFID then run on rank 0.

It says what it is doing, one line per stage ("evaluating: test split 961 images", "FID reference (once): ..."),
with a progress bar over the images of each pass (off with --quiet). The Inception network comes from
`fid_extractor`, the one place that builds it (tests replace it with a random-weight network through a fixture).
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor
from tqdm import tqdm

from bench.fid import fid_metrics, lpips_metric, reference_cache_path
from bench.inception import FidExtractor, default_cache_dir, find_inception_weights, load_extractor
from bench.metrics import PROTOCOL_METRICS, evaluate_split, is_finite
from bench.prior import prior_config, run_stage2
from methods import collective


def whole_split(split) -> Tensor:
    """A split as one uint8 tensor on the CPU (streamed splits are read in full: FID needs every image)."""
    return split.cpu() if isinstance(split, Tensor) else split[0:len(split)].cpu()


def fid_extractor(spec, device) -> tuple[FidExtractor | None, str | None]:
    """The standard FID Inception network on `device`, or (None, why no weights were found)."""
    weights, why = find_inception_weights(spec.inception_weights)
    if weights is None:
        return None, why
    return load_extractor(weights, device), None


@contextlib.contextmanager
def counting(module: torch.nn.Module, total: int, what: str, progress: bool):
    """A progress bar over `total` images, advanced by every forward call of `module` (by its batch size)."""
    bar = tqdm(total=total, desc=what, unit="img", disable=not progress, dynamic_ncols=True, leave=False)
    def advance(_, args):  # returns None: a pre-hook's non-None result would replace the input (tqdm's update
        bar.update(len(args[0]))  # returns True when it redraws)

    handle = module.register_forward_pre_hook(advance)
    try:
        yield
    finally:
        handle.remove()
        bar.close()


def say(text: str) -> None:
    if collective.rank() == 0:
        print(text, flush=True)


def final_split(data, spec):
    """The split of the final evaluation: the test split, or for a tuning trial (eval_split = "val") the
    validation split, so that choosing among trials never reads the test split."""
    return data.val if spec.eval_split == "val" else data.test


def evaluate_test(model, data, spec, autocast, progress: bool = True) -> tuple[dict, dict, dict] | None:
    """-> (metrics, null_reasons, info). Every protocol metric is a key of metrics; each None has a reason.
    The split is the test split unless the run says eval_split = "val" (a tuning trial); info names it.

    Under several ranks every rank calls it: each reconstructs and measures its slice of the test split
    (evaluate_split, sharded), rank 0 receives the whole split's reconstructions and alone goes on (rFID, KID,
    LPIPS, gFID); the other ranks return None once their slice is done."""
    device = next(model.parameters()).device
    split, split_name = final_split(data, spec), spec.eval_split
    say(f"evaluating: {split_name} split {len(split)} images (reconstruction, codebook, SSIM"
        f"{', rFID, KID' if spec.fid else ''}{', gFID' if spec.gfid else ''})"
        f"{f', {collective.world_size()} ranks' if collective.distributed() else ''}")
    with counting(model, len(collective.shard(len(split))), f"{split_name} split", progress):  # this rank's images
        result = evaluate_split(model, split, model.quantizer.codebook_size, spec.eval_batch_size, autocast,
                                keep_reconstructions=True, ssim=True, sharded=True)
    if collective.rank() != 0:
        return None
    metrics = {name: None for name in PROTOCOL_METRICS}
    metrics.update(result.metrics)
    null_reasons: dict[str, str] = {}
    # code_histogram: (K,) counts, or (code_depth, K) for a method with several codes per position
    info: dict = {"eval_split": split_name, f"{split_name}_images": len(split), "code_histogram": result.histogram.tolist(),
                  "code_depth": getattr(model.quantizer, "code_depth", 1),
                  "reconstructions": result.reconstructions}
    real_images = whole_split(split)

    extractor = fid_extractor(spec, device)[0] if spec.fid else None
    if spec.fid:
        fid, reasons, fid_info = inception_pass(extractor, spec, real_images, result.reconstructions,
                                                f"{spec.dataset}/{split_name}", "reconstructed", device, progress)
        metrics["rfid"], metrics["kid"] = fid["rfid"], fid["kid"]
        null_reasons.update({k: v for k, v in reasons.items() if k in metrics})
        info.update(fid_info, kid_std=fid["kid_std"])
    else:
        null_reasons["rfid"] = null_reasons["kid"] = "rFID off for this run (fid = false)"

    say(f"LPIPS: {split_name} split")
    metrics["lpips"], reason = lpips_metric(real_images.float() / 255, result.reconstructions.float() / 255,
                                            device=device)
    if reason:
        null_reasons["lpips"] = reason

    if spec.gfid:
        gfid_stage(model, data, spec, autocast, device, extractor, progress, metrics, null_reasons, info)
    else:
        null_reasons["gfid"] = null_reasons["prior_bits_per_code"] = "stage-2 prior off for this run (pass --gfid)"

    for name, value in metrics.items():
        if value is not None and not is_finite(value):
            metrics[name] = None
            null_reasons[name] = f"non-finite value ({value}): training diverged"
    return metrics, {k: v for k, v in null_reasons.items() if metrics[k] is None}, info


def inception_pass(extractor, spec, real: Tensor, fake: Tensor, reference_key: str, what: str, device,
                   progress: bool) -> tuple[dict, dict, dict]:
    """fid_metrics with a line saying what runs and a progress bar over the Inception passes. Without an
    extractor (no weights found), fid_metrics's own lookup gives the metrics as null with the reason."""
    if extractor is None:
        return fid_metrics(real, fake, reference_key=reference_key, device=device, weights_path=spec.inception_weights)
    cached = reference_cache_path(default_cache_dir(), reference_key, len(real), extractor.weights_sha256).is_file()
    if not cached:
        say(f"FID reference (once): Inception features of the {len(real)} images of {reference_key}, cached for "
            f"later runs")
    say(f"FID: Inception features of {len(fake)} {what} images")
    total = len(fake) + (0 if cached else len(real))
    with counting(extractor.module, total, "Inception", progress):
        return fid_metrics(real, fake, reference_key=reference_key, device=device, extractor=extractor)


def gfid_stage(model, data, spec, autocast, device, extractor, progress, metrics, null_reasons, info) -> None:
    """Stage 2: a prior over the training split's code grids, sampled, decoded, compared with the training split."""
    config = prior_config(spec)
    say(f"stage-2 prior: code grids of {len(data.train)} training images, {config.steps} steps, "
        f"{config.samples} samples")
    with collective.rank_local():  # rank 0 alone, the others at a barrier: no collective in a method's forward
        samples, prior_info = run_stage2(model, data, model.quantizer.codebook_size, config, device, autocast,
                                         spec.eval_batch_size)
    metrics["prior_bits_per_code"] = prior_info["prior_bits_per_code"]
    info["prior"] = {k: v for k, v in prior_info.items() if k != "null_reason"}
    if samples is None:
        null_reasons["gfid"] = prior_info["null_reason"]
        return
    if not spec.fid:
        null_reasons["gfid"] = "FID off for this run (fid = false)"
        return
    fid, reasons, fid_info = inception_pass(extractor, spec, whole_split(data.train), samples,
                                            f"{spec.dataset}/train", "sampled", device, progress)
    metrics["gfid"] = fid["rfid"]
    if reasons.get("rfid"):
        null_reasons["gfid"] = reasons["rfid"]
    info["gfid"] = {k: v for k, v in fid_info.items()}


