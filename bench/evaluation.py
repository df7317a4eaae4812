"""The final evaluation of a run on the test split: every metric of the protocol, or null with its reason.

Reconstruction and codebook metrics come from one pass over the test split (bench.metrics); rFID and KID
compare the reconstructions with the test images through the standard FID Inception (bench.fid); LPIPS needs
ImageNet VGG16 weights; gFID trains the stage-2 prior (bench.prior), samples it and compares the samples with
the training split.
"""
from __future__ import annotations


from torch import Tensor

from bench.fid import fid_metrics, lpips_metric
from bench.metrics import PROTOCOL_METRICS, evaluate_split, is_finite
from bench.prior import prior_config, run_stage2


def whole_split(split) -> Tensor:
    """A split as one uint8 tensor on the CPU (streamed splits are read in full: FID needs every image)."""
    return split.cpu() if isinstance(split, Tensor) else split[0:len(split)].cpu()


def evaluate_test(model, data, spec, autocast, fid_extractor=None) -> tuple[dict, dict, dict]:
    """-> (metrics, null_reasons, info). Every protocol metric is a key of metrics; each None has a reason.

    fid_extractor replaces the Inception network (tests inject a random one; its numbers are not FID).
    """
    device = next(model.parameters()).device
    result = evaluate_split(model, data.test, model.quantizer.codebook_size, spec.eval_batch_size, autocast,
                            keep_reconstructions=True, ssim=True)
    metrics = {name: None for name in PROTOCOL_METRICS}
    metrics.update(result.metrics)
    null_reasons: dict[str, str] = {}
    # code_histogram: (K,) counts, or (code_depth, K) for a method with several codes per position
    info: dict = {"test_images": len(data.test), "code_histogram": result.histogram.tolist(),
                  "code_depth": getattr(model.quantizer, "code_depth", 1),
                  "reconstructions": result.reconstructions}
    test_images = whole_split(data.test)

    if spec.fid:
        fid, reasons, fid_info = fid_metrics(
            test_images, result.reconstructions, reference_key=f"{spec.dataset}/test", device=device,
            weights_path=spec.inception_weights, extractor=fid_extractor)
        metrics["rfid"], metrics["kid"] = fid["rfid"], fid["kid"]
        null_reasons.update({k: v for k, v in reasons.items() if k in metrics})
        info.update(fid_info, kid_std=fid["kid_std"])
    else:
        null_reasons["rfid"] = null_reasons["kid"] = "rFID off for this run (fid = false)"

    metrics["lpips"], reason = lpips_metric(test_images.float() / 255, result.reconstructions.float() / 255,
                                            device=device)
    if reason:
        null_reasons["lpips"] = reason

    if spec.gfid:
        gfid_stage(model, data, spec, autocast, device, fid_extractor, metrics, null_reasons, info)
    else:
        null_reasons["gfid"] = null_reasons["prior_bits_per_code"] = "stage-2 prior off for this run (pass --gfid)"

    for name, value in metrics.items():
        if value is not None and not is_finite(value):
            metrics[name] = None
            null_reasons[name] = f"non-finite value ({value}): training diverged"
    return metrics, {k: v for k, v in null_reasons.items() if metrics[k] is None}, info


def gfid_stage(model, data, spec, autocast, device, fid_extractor, metrics, null_reasons, info) -> None:
    """Stage 2: a prior over the training split's code grids, sampled, decoded, compared with the training split."""
    config = prior_config(spec)
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
    fid, reasons, fid_info = fid_metrics(whole_split(data.train), samples, reference_key=f"{spec.dataset}/train",
                                         device=device, weights_path=spec.inception_weights, extractor=fid_extractor)
    metrics["gfid"] = fid["rfid"]
    if reasons.get("rfid"):
        null_reasons["gfid"] = reasons["rfid"]
    info["gfid"] = {k: v for k, v in fid_info.items()}


