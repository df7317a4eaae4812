"""VQGAN (Esser et al. 2021, taming-transformers): its encoder/decoder, perceptual and adversarial losses.

Encoder: a 3x3 convolution to `ch` channels; per level i (of len(ch_mult)) `num_res_blocks` ResNet blocks
(GroupNorm, Swish, 3x3 convolutions) to ch * ch_mult[i] channels, each followed by self-attention where the
level's resolution is in `attn_resolutions`, and a stride-2 downsampling after every level but the last
(so f = 2^(len(ch_mult) - 1): f16 for [1, 1, 2, 2, 4], f8 for [1, 2, 2, 4]); a middle ResNet-attention-ResNet
block; GroupNorm, Swish, a 3x3 convolution to `z_channels` and a 1x1 projection to the code dimension.
Decoder: the mirror image, with `num_res_blocks + 1` blocks per level and nearest-neighbour upsampling.

Generator objective (VQGANModel.task_loss), the task loss every method trains on (MQ's meta-objective too):
    rec + perceptual_weight * LPIPS + aux_loss + [step >= disc_start] * disc_weight * lambda * (-mean D(x_rec))
with lambda = |grad_last rec+perc| / (|grad_last adv| + 1e-4) clamped to [0, 1e4], the gradient norms taken at
the decoder's last convolution weight (taming's adaptive weight). The discriminator trains on the hinge loss in
`after_step`, from step disc_start = round(fraction x total steps) on, with its own Adam(W) optimizer. Its fake
images are the reconstruction of the step's batch made by the method's first task-loss call, i.e. before the
autoencoder's update (taming and the MQ authors run the generator once more after the update: one more forward
per step, which we save); should a method never evaluate that batch, it is reconstructed afresh in eval mode.

Model settings come from spec.model_options (`VQGANOptions` declares them with their defaults).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from bench import UserError
from bench.options import build, option
from bench.models import VQModel
from bench.models.init import initialize
from bench.models.discriminator import NLayerDiscriminator, hinge_d_loss, hinge_g_loss
from bench.models.perceptual import LPIPS
from methods import Quantizer, QuantizerOutput, collective
from methods.schedules import warmup_cosine

@dataclass
class VQGANOptions:
    """spec.model_options of `vqgan`. Defaults: taming-transformers' f16 ImageNet VQGAN (ch 128, ch_mult
    1,1,2,2,4, 2 blocks, attention at 16x16, z_channels 256, disc_weight 0.8, 3-layer discriminator with 64
    channels), the warm-up as a fraction (0.1: the MQ authors' default for FFHQ)."""

    ch: int = option(128, minimum=1)
    ch_mult: tuple[int, ...] = option((1, 1, 2, 2, 4), minimum=1)
    num_res_blocks: int = option(2, minimum=1)
    attn_resolutions: tuple[int, ...] = option((16,), minimum=1)
    z_channels: int = option(256, minimum=1)
    dropout: float = option(0.0, minimum=0)
    norm_groups: int = option(32, "GroupNorm groups; every channel count must divide by it", minimum=1)
    resolution: int | None = option(None, "input size, to place attention; None: the dataset's image size", minimum=1)
    perceptual_weight: float = option(1.0, "weight of the perceptual (LPIPS) term; 0: none, no VGG needed",
                                      flag="--perceptual-weight", minimum=0)
    perceptual_weights_path: str | None = option(None, "torchvision's vgg16-397923af.pth; None: torch hub's cache; "
                                                       "'random': TESTS ONLY")
    lpips_heads_path: str | None = option(None, "LPIPS v0.1 vgg.pth; None: the copy inside torchmetrics")
    disc_weight: float = option(0.8, "0: no discriminator at all", minimum=0)
    disc_start: float = option(0.1, "fraction of the run's steps before the adversarial terms switch on", minimum=0)
    disc_layers: int = option(3, minimum=1)
    disc_channels: int = option(64, minimum=1)
    disc_lr: float | None = option(None, "None: the run's lr", above=0)
    disc_betas: tuple[float, float] | None = option(None, "None: the run's betas", minimum=0)
    disc_schedule: Literal["constant", "cosine"] = option(
        "constant", "cosine: warm-up over warmup_steps of its own steps, then cosine to 0")
    init: Literal["default", "normal-0.02"] = option(
        "default", "encoder and decoder; normal-0.02: the MQ authors' weights_init (bench/models/init.py); "
                   "default: PyTorch's (the discriminator is always DCGAN-initialized)")




def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, dropout: float, groups: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_ch, groups), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2, self.conv2 = group_norm(out_ch, groups), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:  # (B, in, H, W) -> (B, out, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, residual. Through scaled_dot_product_attention, so a GPU
    runs a fused kernel and never holds the (HW, HW) matrix."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H, W)
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(2, 3)  # (B, 3, HW, C)
        q, k, v = qkv.unbind(1)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, HW, C), 1/sqrt(C)
        return x + self.proj(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H/2, W/2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # taming's asymmetric padding: exactly H/2 outputs


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def middle(channels: int, dropout: float, groups: int) -> nn.Sequential:
    return nn.Sequential(ResnetBlock(channels, channels, dropout, groups), AttnBlock(channels, groups),
                         ResnetBlock(channels, channels, dropout, groups))


class Encoder(nn.Module):
    def __init__(self, *, ch: int, ch_mult: list[int], num_res_blocks: int, attn_resolutions: list[int],
                 resolution: int, z_channels: int, code_dim: int, dropout: float, groups: int, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ch, 3, padding=1)]
        block_in, res = ch, resolution
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                layers.append(ResnetBlock(block_in, ch * mult, dropout, groups))
                block_in = ch * mult
                if res in attn_resolutions:
                    layers.append(AttnBlock(block_in, groups))
            if level != len(ch_mult) - 1:
                layers.append(Downsample(block_in))
                res //= 2
        layers += [middle(block_in, dropout, groups), group_norm(block_in, groups), nn.SiLU(),
                   nn.Conv2d(block_in, z_channels, 3, padding=1),
                   nn.Conv2d(z_channels, code_dim, 1)]  # taming's quant_conv: to the code dimension
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, D, H/f, W/f)
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, *, ch: int, ch_mult: list[int], num_res_blocks: int, attn_resolutions: list[int],
                 resolution: int, z_channels: int, code_dim: int, dropout: float, groups: int, out_channels: int = 3):
        super().__init__()
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        layers: list[nn.Module] = [nn.Conv2d(code_dim, z_channels, 1),  # taming's post_quant_conv
                                   nn.Conv2d(z_channels, block_in, 3, padding=1), middle(block_in, dropout, groups)]
        for level in reversed(range(len(ch_mult))):
            for _ in range(num_res_blocks + 1):
                layers.append(ResnetBlock(block_in, ch * ch_mult[level], dropout, groups))
                block_in = ch * ch_mult[level]
                if res in attn_resolutions:
                    layers.append(AttnBlock(block_in, groups))
            if level != 0:
                layers.append(Upsample(block_in))
                res *= 2
        layers += [group_norm(block_in, groups), nn.SiLU()]
        self.net = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    @property
    def last_layer(self) -> Tensor:
        """The weight the adaptive generator weight compares gradient norms at."""
        return self.conv_out.weight

    def forward(self, z_q: Tensor) -> Tensor:  # (B, D, h, w) -> (B, 3, h*f, w*f)
        return self.conv_out(self.net(z_q))


def adaptive_weight(nll: Tensor, g_loss: Tensor, last_layer: Tensor) -> Tensor:
    """taming's lambda = |d nll / d w| / (|d g_loss / d w| + 1e-4), clamped to [0, 1e4], detached (a scalar on the
    device: no host sync). Zero when no graph exists (under no_grad): there is no gradient to balance."""
    if not (torch.is_grad_enabled() and nll.requires_grad and g_loss.requires_grad):
        return nll.new_zeros(()).float()
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    # data parallelism: the norms of the global batch's gradients (each rank's loss is a mean over its slice)
    collective.all_reduce_mean_list_([nll_grad, g_grad])
    weight = torch.linalg.vector_norm(nll_grad.float()) / (torch.linalg.vector_norm(g_grad.float()) + 1e-4)
    return weight.clamp(0.0, 1e4).detach()


class VQGANModel(VQModel):
    """VQModel whose task loss adds the perceptual and adversarial generator terms, and which trains its own
    discriminator after every step of the method (after_step), whatever the method."""

    def __init__(self, encoder: Encoder, quantizer: Quantizer, decoder: Decoder, recon_loss: str, *,
                 perceptual: LPIPS | None, perceptual_weight: float, discriminator: NLayerDiscriminator | None,
                 disc_weight: float, disc_start: float, disc_lr: float, disc_betas: tuple[float, float],
                 disc_schedule: str, disc_warmup_steps: int):
        super().__init__(encoder, quantizer, decoder, recon_loss)
        self.perceptual, self.perceptual_weight = perceptual, perceptual_weight
        self.discriminator, self.disc_weight = discriminator, disc_weight
        self.disc_start, self.disc_lr, self.disc_betas = disc_start, disc_lr, tuple(disc_betas)
        self.disc_schedule, self.disc_warmup_steps = disc_schedule, disc_warmup_steps
        self.disc_optimizer: torch.optim.Optimizer | None = None
        self.total_steps = 0
        self.disc_start_step = math.inf  # no adversarial term until setup_training says when
        self.step = 0
        self._fake: tuple[Tensor, Tensor] | None = None  # (images, detached reconstruction) of this step's first call
        self.last: dict[str, Tensor] = {}  # the latest loss terms (detached device scalars), for tests and logs

    @property
    def adversarial(self) -> bool:
        """Whether the discriminator and the generator's adversarial term are on at the current step."""
        return self.discriminator is not None and self.step >= self.disc_start_step

    # --- the generator objective ---------------------------------------------------------------------------

    def task_loss(self, images: Tensor) -> tuple[Tensor, QuantizerOutput]:
        x = self.preprocess(images)
        recon, out = self(x)
        recon = recon.float()
        if self._fake is None:  # the step's first call is the method's step on the harness's batch
            self._fake = (images, recon.detach())
        rec = F.l1_loss(recon, x) if self.recon_loss == "l1" else F.mse_loss(recon, x)
        nll = rec
        terms = {"rec": rec.detach()}
        if self.perceptual is not None:
            perceptual = self.perceptual(x, recon).mean()
            nll = nll + self.perceptual_weight * perceptual
            terms["perceptual"] = perceptual.detach()
        loss = nll + out.aux_loss
        if self.adversarial:
            # the discriminator's parameters enter as constants: the generator's backward must not fill their grads
            frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
            g_loss = hinge_g_loss(functional_call(self.discriminator, frozen, (recon,)))
            weight = adaptive_weight(nll, g_loss, self.decoder.last_layer)
            loss = loss + self.disc_weight * weight * g_loss
            terms.update(g_loss=g_loss.detach(), adaptive_weight=weight)
        self.last.update(terms)
        out.diagnostics.update({f"vqgan/{k}": v for k, v in terms.items()})
        return loss, out

    # --- the model's training hooks --------------------------------------------------------------------------

    def setup_training(self, total_steps: int) -> None:
        self.total_steps = total_steps
        self.disc_start_step = round(self.disc_start * total_steps)
        if self.discriminator is not None:
            self.disc_optimizer = torch.optim.AdamW(self.discriminator.parameters(), lr=self.disc_lr,
                                                    betas=self.disc_betas, weight_decay=0.0)
            collective.average_gradients_before_step(self.disc_optimizer)  # data parallelism: the global mean

    def before_step(self, step: int) -> None:
        self.step = step
        self._fake = None

    def after_step(self, images: Tensor) -> None:
        """One hinge-loss step of the discriminator on the real batch and its reconstruction, once warm."""
        if not self.adversarial or self.disc_optimizer is None:
            return
        fake = self._fake[1] if self._fake is not None and self._fake[0] is images else self.reconstruct(images)
        self._fake = None
        if self.disc_schedule == "cosine":
            factor = warmup_cosine(self.step - self.disc_start_step, self.disc_warmup_steps,
                                     self.total_steps - self.disc_start_step)
            for group in self.disc_optimizer.param_groups:
                group["lr"] = self.disc_lr * factor
        real = self.preprocess(images)
        # one call on both halves would mix real and fake in the BatchNorm statistics: two calls, as pix2pix
        d_loss = hinge_d_loss(self.discriminator(real), self.discriminator(fake))
        self.disc_optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        self.disc_optimizer.step()
        self.last["d_loss"] = d_loss.detach()

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        """The reconstruction for the discriminator when the method's calls did not include this batch: the
        autoencoder in eval mode, so that no quantizer updates itself (EMA codebooks) a second time."""
        modules = (self.encoder, self.quantizer, self.decoder)
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()
        try:
            return self(self.preprocess(images))[0].float()
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)

    def training_state(self) -> dict:
        return {"disc_optimizer": self.disc_optimizer.state_dict() if self.disc_optimizer is not None else None}

    def load_training_state(self, state: dict) -> None:
        if self.disc_optimizer is not None and state.get("disc_optimizer") is not None:
            self.disc_optimizer.load_state_dict(state["disc_optimizer"])

    def record_note(self) -> dict:
        """What the record should say about the model's fixed parts (the perceptual network's weights)."""
        return {"perceptual": self.perceptual.note if self.perceptual is not None else None}


# --- construction from a RunSpec --------------------------------------------------------------------------------

def vqgan_options(spec) -> dict:
    """spec.model_options over VQGANOptions, typed and checked; unknown keys and bad values: one UserError."""
    o = asdict(build(VQGANOptions, spec.model_options, "vqgan model option(s)", prefix="vqgan option "))
    if o["resolution"] is None:
        from bench.datasets import image_size

        o["resolution"] = image_size(spec.dataset)
    if o["disc_start"] > 1.0:
        raise UserError(f"vqgan option disc_start is a fraction of the run's steps in [0, 1], got {o['disc_start']!r}")
    if o["disc_betas"] is not None and not all(b < 1 for b in o["disc_betas"]):
        raise UserError(f"vqgan option disc_betas must be two numbers in [0, 1) or null, got {o['disc_betas']!r}")
    for channels in {o["ch"] * m for m in o["ch_mult"]}:
        if channels % o["norm_groups"]:
            raise UserError(f"vqgan: {channels} channels do not divide into norm_groups={o['norm_groups']} "
                            f"GroupNorm groups; change ch, ch_mult or norm_groups")
    factor = 2 ** (len(o["ch_mult"]) - 1)
    if o["resolution"] % factor:
        raise UserError(f"vqgan: resolution {o['resolution']} is not divisible by the downsampling factor {factor}")
    return o


def build_perceptual(o: dict, download: bool) -> LPIPS | None:
    if o["perceptual_weight"] == 0:
        return None  # no VGG built, loaded or needed
    if o["perceptual_weights_path"] == "random":
        return LPIPS.random()
    return LPIPS.from_files(o["perceptual_weights_path"], o["lpips_heads_path"], download)


def build_vqgan(spec, quantizer: Quantizer) -> VQGANModel:
    o = vqgan_options(spec)
    shape = dict(ch=o["ch"], ch_mult=list(o["ch_mult"]), num_res_blocks=o["num_res_blocks"],
                 attn_resolutions=list(o["attn_resolutions"]), resolution=o["resolution"], z_channels=o["z_channels"],
                 code_dim=spec.code_dim, dropout=float(o["dropout"]), groups=o["norm_groups"])
    encoder, decoder = Encoder(**shape), Decoder(**shape)
    discriminator = None
    if o["disc_weight"] > 0:
        discriminator = NLayerDiscriminator(3, o["disc_channels"], o["disc_layers"])
    perceptual = build_perceptual(o, spec.download)
    initialize([encoder, decoder], o["init"])  # last: for one seed, init changes nothing else
    return VQGANModel(
        encoder, quantizer, decoder, spec.recon_loss,
        perceptual=perceptual, perceptual_weight=float(o["perceptual_weight"]),
        discriminator=discriminator, disc_weight=float(o["disc_weight"]), disc_start=float(o["disc_start"]),
        disc_lr=float(o["disc_lr"] if o["disc_lr"] is not None else spec.lr),
        disc_betas=tuple(o["disc_betas"] if o["disc_betas"] is not None else spec.betas),
        disc_schedule=o["disc_schedule"], disc_warmup_steps=spec.warmup_steps,
    )
