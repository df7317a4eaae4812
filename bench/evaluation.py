"""The final evaluation of a run on the test split: every metric of the protocol, or null with its reason."""
from __future__ import annotations

from bench.metrics import PROTOCOL_METRICS, evaluate_split, is_finite


def evaluate_test(model, data, spec, autocast) -> tuple[dict, dict, dict]:
    """-> (metrics, null_reasons, info). Every protocol metric is a key of metrics; a None has a reason."""
    result = evaluate_split(model, data.test, model.quantizer.codebook_size, spec.eval_batch_size, autocast,
                            keep_reconstructions=True, ssim=True)
    metrics = {name: None for name in PROTOCOL_METRICS}
    null_reasons: dict[str, str] = {}
    info: dict = {"test_images": len(data.test), "code_histogram": result.histogram.tolist(),
                  "reconstructions": result.reconstructions}
    metrics.update(result.metrics)

    null_reasons["rfid"] = null_reasons["kid"] = "FID is not part of this build yet"
    null_reasons["lpips"] = "LPIPS is not part of this build yet"
    null_reasons["gfid"] = null_reasons["prior_bits_per_code"] = "stage-2 prior is not part of this build yet"

    for name, value in metrics.items():
        if value is not None and not is_finite(value):
            metrics[name] = None
            null_reasons[name] = f"non-finite value ({value}): training diverged"
    return metrics, {k: v for k, v in null_reasons.items() if metrics[k] is None}, info
