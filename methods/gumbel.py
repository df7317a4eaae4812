"""Gumbel-softmax vector quantization (Jang et al. 2017, Maddison et al. 2017; as a VQ bottleneck in DALL-E's
dVAE, Ramesh et al. 2021, and taming-transformers' GumbelQuantize).

`gumbel`: a 1x1 convolution maps the encoder output (D channels) to K logits per position; a code is sampled
with the Gumbel-max trick and the decoder sees its codebook vector exactly (hard sample), while the gradient
flows through the relaxed sample softmax((logits + g) / tau) (straight-through Gumbel-softmax). The temperature
tau is annealed from tau_start to tau_end over training (DALL-E: 1 -> 1/16, cosine), and the aux loss is
kl_weight * KL(q || uniform) with q = softmax(logits), averaged over positions (taming's default weight 5e-4).
In evaluation the code is the argmax of the logits: deterministic.

Native, not vector-quantize-pytorch: the library's Gumbel path takes its straight-through gradient from a
softmax over distances, not from a relaxed sample over logits, so it is not this method.

quant_error: this method has no encoder vector in code space to compare against, so it reports the gap of
its estimator: mean |(one_hot - y_soft) @ C|^2, the squared distance between the code the decoder sees and the
relaxed code whose gradient it receives (y_soft with the Gumbel noise while training, softmax(logits / tau)
in evaluation). It shrinks as tau anneals and the logits sharpen.

The temperature is a function of (step, total_steps) only, set by `training_step` before each step, and is
also kept as a buffer so that evaluation of a restored checkpoint uses the temperature it was trained at.
The Gumbel noise is drawn from torch's global RNG, which the harness checkpoints.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from methods import collective
from methods.base import Quantizer, QuantizerOutput, StepResult, TrainContext, standard_step
from methods.registry import MethodError, register

SCHEDULES = ("exp", "linear", "cosine")


def annealed_temperature(step: int, total_steps: int, tau_start: float, tau_end: float, schedule: str) -> float:
    """The temperature before step `step` of `total_steps`: tau_start at 0, tau_end at total_steps and after."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    if schedule == "exp":  # geometric: equal ratios per step
        return tau_start * (tau_end / tau_start) ** progress
    if schedule == "linear":
        return tau_start + (tau_end - tau_start) * progress
    if schedule == "cosine":
        return tau_end + 0.5 * (tau_start - tau_end) * (1.0 + math.cos(math.pi * progress))
    raise MethodError(f"unknown temperature schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")


def gumbel_noise(like: Tensor) -> Tensor:
    """Standard Gumbel samples shaped like `like`, from the global RNG: -log(-log U), U uniform. (torch's
    F.gumbel_softmax takes -log of exponential_ draws instead, which costs 5x as much on a CPU.) U is kept off 0,
    where the sample would be -inf.

    Under data parallelism `like` holds this rank's rows of the global batch (equal contiguous slices): every
    rank draws the uniforms of the WHOLE global batch from its global RNG (identical on every rank: same seed,
    same draws) and keeps its own rows, so row i's noise is that of the one-process run at any world size."""
    world = collective.world_size()
    if world > 1:
        n = like.shape[0]
        start = collective.rank() * n
        uniform = torch.rand((n * world, *like.shape[1:]), dtype=like.dtype, device=like.device)[start:start + n]
        uniform = uniform.clamp_(min=torch.finfo(like.dtype).tiny)
    else:
        uniform = torch.rand_like(like).clamp_(min=torch.finfo(like.dtype).tiny)
    return uniform.log_().neg_().log_().neg_()


@register("gumbel", palette_slot=4, search_space={"kl_weight": (5e-5, 5e-4, 5e-3), "tau_end": (0.0625, 0.25, 0.5)})
class GumbelVQ(Quantizer):
    def __init__(
        self,
        dim: int,
        codebook_size: int,
        kl_weight: float = 5e-4,
        tau_start: float = 1.0,
        tau_end: float = 1.0 / 16,
        schedule: str = "cosine",
    ):
        super().__init__()
        if schedule not in SCHEDULES:
            raise MethodError(f"gumbel: unknown schedule {schedule!r}; pass schedule= one of {', '.join(SCHEDULES)}")
        if not (tau_start > 0 and tau_end > 0):
            raise MethodError(f"gumbel: temperatures must be positive, got tau_start={tau_start}, tau_end={tau_end}")
        self.dim, self.codebook_size = dim, codebook_size
        self.kl_weight = kl_weight
        self.tau_start, self.tau_end, self.schedule = tau_start, tau_end, schedule
        self.to_logits = nn.Conv2d(dim, codebook_size, 1)
        self.codebook = nn.Embedding(codebook_size, dim)
        self.register_buffer("temperature", torch.tensor(float(tau_start)))

    def temperature_at(self, step: int, total_steps: int) -> float:
        return annealed_temperature(step, total_steps, self.tau_start, self.tau_end, self.schedule)

    def training_step(self, ctx: TrainContext, images: Tensor) -> StepResult:
        # fill_ with a Python float launches a kernel and never waits on the device
        self.temperature.fill_(self.temperature_at(ctx.step, ctx.total_steps))
        return standard_step(ctx, images)

    def forward(self, z: Tensor) -> QuantizerOutput:
        b, _, h, w = z.shape
        # logits, softmax and argmax in float32: bf16 logits tie and flip codes
        with torch.autocast(z.device.type, enabled=False):
            logits = self.to_logits(z.float())  # (B, K, H, W)
            logits = logits.permute(0, 2, 3, 1).reshape(-1, self.codebook_size)  # (N, K)
            codebook = self.codebook.weight.float()  # (K, D)
            noisy = logits + gumbel_noise(logits) if self.training else logits
            y_soft = (noisy / self.temperature).softmax(-1)  # (N, K)
            idx = noisy.argmax(-1)  # (N,), the argmax of y_soft
            # The straight-through estimator (one_hot + y_soft - sg(y_soft)) @ C, without the (N, K) one-hot: its
            # value is exactly C[idx] (soft - soft == 0), the codebook's gradient is the hard sample's (index_add
            # of the incoming rows) and y_soft's is the soft sample's, g @ C^T.
            hard_rows = codebook.index_select(0, idx)  # (N, D)
            soft_rows = y_soft @ codebook.detach()  # (N, D)
            rows = hard_rows + (soft_rows - soft_rows.detach()) if self.training else hard_rows
            log_q = logits.log_softmax(-1)
            kl = (log_q.exp() * (log_q + math.log(self.codebook_size))).sum(-1).mean()
            gap = (hard_rows - soft_rows).detach().pow(2).mean()
        quantized = rows.reshape(b, h, w, self.dim).permute(0, 3, 1, 2).to(z.dtype)  # (B, D, H, W)
        indices = idx.reshape(b, h, w)
        diagnostics = {"temperature": self.temperature.detach().clone(), "kl_to_uniform": kl.detach()}
        return QuantizerOutput(quantized, indices, self.kl_weight * kl, gap, diagnostics)

    def decode_indices(self, indices: Tensor) -> Tensor:
        return self.codebook(indices).permute(0, 3, 1, 2)  # (B, H, W) -> (B, D, H, W)

    def export_codebook(self) -> Tensor:
        return self.codebook.weight.detach().clone()
