"""The method contract: what every quantizer adapter is, returns and may override.

A quantizer adapter sits between encoder and decoder. It takes the encoder's feature map z of shape
(B, D, H, W) and returns a `QuantizerOutput`. The harness (bench/) only ever talks to this interface, so a
new method is one module in methods/ plus one `@register` line, with no change elsewhere.

This module imports nothing from bench/: the training step a method may replace is described here by
`TrainContext`, which the harness fills in.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Iterable

import torch
from torch import Tensor, nn


@dataclass
class QuantizerOutput:
    quantized: Tensor  # (B, D, H, W), what the decoder sees; gradients reach z by the method's estimator
    indices: Tensor  # (B, H, W) int64 code indices in [0, codebook_size); (B, H, W, depth) where code_depth > 1
    aux_loss: Tensor  # scalar, the method's own loss term (zero where it has none), added to the task loss
    quant_error: Tensor  # scalar, detached mean |z - z_q|^2 in the space where the search happens
    diagnostics: dict[str, Tensor] = field(default_factory=dict)  # scalar tensors, never synced per step


@dataclass
class StepResult:
    """What a training step hands back to the harness for logging."""

    loss: Tensor  # scalar task loss of the autoencoder step (detached)
    output: QuantizerOutput  # the quantizer output of that step's batch


@dataclass
class TrainContext:
    """Everything a method's own update rule may touch, built by the harness once per run.

    loss_fn(images) runs the model on a uint8 batch (B, 3, H, W) and returns (task loss, QuantizerOutput).
    The task loss is the model's whole generator objective: reconstruction + the method's aux loss (+ the
    perceptual and adversarial terms for VQGAN), under the run's autocast. draw_batch() returns a further
    training batch from a seeded stream of its own whose position the harness checkpoints.
    """

    model: nn.Module  # has preprocess(uint8) -> float input, encode(x) -> z (B, D, h, w), quantizer, decode(z_q)
    loss_fn: Callable[[Tensor], tuple[Tensor, QuantizerOutput]]
    optimizer: torch.optim.Optimizer  # the autoencoder's optimizer (encoder, decoder, autoencoder_parameters())
    draw_batch: Callable[[], Tensor]
    step: int = 0  # the harness sets this before each call: index of the step about to run
    total_steps: int = 0
    autocast: Callable[[], ContextManager] = contextlib.nullcontext  # the run's mixed-precision context


def standard_step(ctx: TrainContext, images: Tensor) -> StepResult:
    """The default update rule: loss = reconstruction + aux loss, backward, one optimizer step."""
    loss, output = ctx.loss_fn(images)
    ctx.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    ctx.optimizer.step()
    return StepResult(loss.detach(), output)


class Quantizer(nn.Module):
    """Base class of every adapter. Subclasses implement `forward` and `decode_indices`.

    `codebook_size` is the number of distinct codes the method can emit (implicit for FSQ/LFQ), so usage and
    perplexity are comparable across methods.

    `code_depth` is the number of codes per latent position: 1 for every single-level method, whose indices are
    (B, H, W); D for a method that stacks D codebooks (residual VQ), whose indices are (B, H, W, D), level i in
    [..., i], each level in [0, codebook_size) of its own codebook of codebook_size codes. The harness counts
    such codes per level and overall (bench.metrics) and the stage-2 prior reads them depth innermost.
    """

    codebook_size: int
    dim: int
    code_depth: int = 1

    def forward(self, z: Tensor) -> QuantizerOutput:  # z: (B, D, H, W)
        raise NotImplementedError

    def decode_indices(self, indices: Tensor) -> Tensor:
        """(B, H, W) int64 -> (B, D, H, W), the quantized map the decoder would see for these codes; a method with
        code_depth > 1 takes (B, H, W, code_depth)."""
        raise NotImplementedError

    # --- training hooks, all optional -------------------------------------------------------------------

    def method_parameters(self) -> list[nn.Parameter]:
        """Parameters trained by the method's own optimizer rather than the autoencoder's."""
        return []

    def autoencoder_parameters(self) -> Iterable[nn.Parameter]:
        """The quantizer's parameters that the autoencoder optimizer trains (the rest of them, by default)."""
        own = {id(p) for p in self.method_parameters()}
        return [p for p in self.parameters() if id(p) not in own and p.requires_grad]

    def setup_training(self, total_steps: int) -> None:
        """Called once before training (and before a checkpoint is restored): build own optimizers here."""

    def training_step(self, ctx: TrainContext, images: Tensor) -> StepResult:
        """The update-rule hook. Override to replace the default step (MQ's bi-level step, for example)."""
        return standard_step(ctx, images)

    def training_state(self) -> dict:
        """State outside the module's state_dict that a checkpoint must keep (own optimizers, counters)."""
        return {}

    def load_training_state(self, state: dict) -> None:
        pass

    def interval_stats(self) -> dict[str, float]:
        """The means of the method's own training measurements since the previous call, then reset (the trainer
        calls it at each validation point and stores them in the curve row as "method/<key>"). The method keeps
        them in training_state(), so a resumed run gives the numbers of an uninterrupted one."""
        return {}

    def run_stats(self) -> dict[str, float]:
        """The means of the method's own training measurements over the whole run so far, with their counts (the
        trainer writes them into the record as `method_stats`); kept in training_state() like interval_stats."""
        return {}

    def export_codebook(self) -> Tensor | None:
        """The codebook as a plain (K, D) tensor where the method has one, else None; (code_depth, K, D), one
        codebook per level, for a method with code_depth > 1."""
        return None

    def export_note(self) -> dict:
        """Anything the record should say about the trained quantizer (e.g. an exported codebook)."""
        return {}


def zero(like: Tensor) -> Tensor:
    return like.new_zeros(())


def nearest_code(flat: Tensor, codebook: Tensor) -> Tensor:
    """Indices of the nearest codes by squared L2. flat: (N, D), codebook: (K, D) -> (N,) int64."""
    # |x|^2 is constant per row and does not change the argmin. One fused addmm: separate multiply and subtract
    # passes over the (N, K) matrix cost 3x the matmul itself on a CPU.
    distances = torch.addmm(codebook.pow(2).sum(1), flat, codebook.t(), alpha=-2.0)  # (N, K)
    return distances.argmin(1)


def to_rows(z: Tensor) -> Tensor:
    """(B, D, H, W) -> (B*H*W, D)"""
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def from_rows(rows: Tensor, like_shape: torch.Size) -> Tensor:
    """(B*H*W, D) -> (B, D, H, W) for a feature map of shape like_shape."""
    b, _, h, w = like_shape
    return rows.reshape(b, h, w, -1).permute(0, 3, 1, 2)
