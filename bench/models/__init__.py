"""Models: an encoder, a quantizer adapter and a decoder, plus the model's own task loss.

`build_model(spec)` looks the model up by name; adding a model is one module plus one entry in MODELS.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch.nn.functional as F
from torch import Tensor, nn

from bench import UserError
from bench.options import build, option
from bench.models.init import initialize
from bench.models.vqvae import Decoder, Encoder
from methods import Quantizer, QuantizerOutput, create_method


class VQModel(nn.Module):
    """encoder -> quantizer adapter -> decoder. Images enter as uint8 and are scaled to [-1, 1]."""

    def __init__(self, encoder: nn.Module, quantizer: Quantizer, decoder: nn.Module, recon_loss: str = "mse"):
        super().__init__()
        self.encoder, self.quantizer, self.decoder = encoder, quantizer, decoder
        self.recon_loss = recon_loss

    @staticmethod
    def preprocess(images: Tensor) -> Tensor:
        """uint8 (B, C, H, W) in [0, 255] -> float (B, C, H, W) in [-1, 1]."""
        return images.float().div_(127.5).sub_(1.0)

    @staticmethod
    def postprocess(x: Tensor) -> Tensor:
        """float in [-1, 1] -> float in [0, 1], clamped."""
        return x.float().add(1.0).mul_(0.5).clamp_(0.0, 1.0)

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def decode(self, z_q: Tensor) -> Tensor:
        return self.decoder(z_q)

    def forward(self, x: Tensor) -> tuple[Tensor, QuantizerOutput]:
        out = self.quantizer(self.encode(x))
        return self.decode(out.quantized), out

    def task_loss(self, images: Tensor) -> tuple[Tensor, QuantizerOutput]:
        """The generator objective every method trains on: reconstruction + the method's aux loss."""
        x = self.preprocess(images)
        recon, out = self(x)
        if self.recon_loss == "l1":
            rec = F.l1_loss(recon.float(), x)
        else:
            rec = F.mse_loss(recon.float(), x)
        return rec + out.aux_loss, out

    # --- the model's own training hooks; the harness calls them for every model, VQGAN fills them in ----------

    def setup_training(self, total_steps: int) -> None:
        """Build the model's own optimizers (VQGAN: the discriminator's) once before training."""

    def before_step(self, step: int) -> None:
        """Called before the method's step, with the index of the step about to run (warm-ups read it)."""

    def after_step(self, images: Tensor) -> None:
        """Runs after the method's step, whatever the method: VQGAN's discriminator step goes here."""

    def training_state(self) -> dict:
        """State outside state_dict that a checkpoint must keep (the discriminator's optimizer, say)."""
        return {}

    def load_training_state(self, state: dict) -> None:
        pass

    def record_note(self) -> dict:
        """What the record's env should say about the model (e.g. which perceptual weights were used)."""
        return {}

    def autoencoder_parameters(self) -> list[nn.Parameter]:
        """What the autoencoder optimizer trains: encoder, decoder and the quantizer's share (its statement)."""
        return [*self.encoder.parameters(), *self.decoder.parameters(), *self.quantizer.autoencoder_parameters()]


@dataclass
class VQVAEOptions:
    """spec.model_options of `vqvae`: only the initialization; its shape is RunSpec fields (width, res_blocks,
    res_width, downsample)."""

    init: Literal["default", "normal-0.02"] = option(
        "default", "normal-0.02: the MQ authors' weights_init (bench/models/init.py); default: PyTorch's")


def build_vqvae(spec, quantizer: Quantizer) -> VQModel:
    o = build(VQVAEOptions, spec.model_options, "vqvae model option(s)", prefix="vqvae option ")
    args = dict(width=spec.width, res_blocks=spec.res_blocks, res_width=spec.res_width,
                code_dim=spec.code_dim, downsample=spec.downsample)
    encoder, decoder = Encoder(**args), Decoder(**args)
    initialize([encoder, decoder], o.init)
    return VQModel(encoder, quantizer, decoder, spec.recon_loss)


@dataclass(frozen=True)
class ModelEntry:
    build: Callable  # (spec, quantizer) -> VQModel
    options: type  # the dataclass declaring the model's own spec.model_options


from bench.models.vqgan import VQGANOptions, build_vqgan  # noqa: E402  (it subclasses VQModel, defined above)
from bench.models.vqvae_mq import VQVAEMQOptions, build_vqvae_mq  # noqa: E402  (likewise)

MODELS: dict[str, ModelEntry] = {
    "vqvae": ModelEntry(build_vqvae, VQVAEOptions),
    "vqvae-mq": ModelEntry(build_vqvae_mq, VQVAEMQOptions),
    "vqgan": ModelEntry(build_vqgan, VQGANOptions),
}


def model_entry(spec) -> ModelEntry:
    if spec.model not in MODELS:
        raise UserError(f"unknown model {spec.model!r}; valid models: {', '.join(sorted(MODELS))}")
    return MODELS[spec.model]


def model_options(spec):
    """spec.model_options as the model's typed options (unknown keys and bad values: one UserError)."""
    return build(model_entry(spec).options, spec.model_options, f"{spec.model} model option(s)",
                 prefix=f"{spec.model} option ")


def build_model(spec) -> VQModel:
    """The model of a RunSpec with its quantizer adapter, on the CPU, initialized from the global torch RNG."""
    entry = model_entry(spec)
    quantizer = create_method(spec.method, dim=spec.code_dim, codebook_size=spec.codebook_size, **spec.method_options)
    return entry.build(spec, quantizer)
