"""Stage 2 for gFID: an autoregressive prior over a trained VQ model's code grids, sampled and decoded.

After stage 1 the VQ model is frozen. Its codes for the training split, an (N, H, W) grid per image, are read
once; a small decoder-only transformer learns p(grid) in raster order (a start token, then the H*W codes);
a method with D codes per position (residual VQ, grids (N, H, W, D)) is read as H*W*D tokens, depth innermost
(RQ-Transformer's order: the D codes of a position, coarsest first, then the next position), each token
embedded with its level's own table (code k of level i is not code k of level j);
its samples go through `quantizer.decode_indices` and the decoder to uint8 images, which the caller compares
with the training split (gFID, bench/fid.py). The prior's held-out negative log-likelihood, in bits per code,
is reported as `prior_bits_per_code`: how predictable a method's codes are, which is what stage 2 has to learn.

The same prior (size, steps, schedule, seed) is used for every method, so differences in gFID come from the
codes. Everything random here (the prior's init, its batches, dropout, sampling) runs inside a forked RNG
seeded from `PriorConfig.seed`: stage 2 is reproducible and leaves the caller's RNG state as it was.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.metrics import to_uint8
from bench.options import build, option
from methods.schedules import warmup_cosine

Autocast = Callable[[], ContextManager]


@dataclass
class PriorConfig:
    """spec.prior_options. Defaults sized for a CPU (minutes); the GPU presets set a larger prior."""

    layers: int = option(2, minimum=1)
    heads: int = option(4, minimum=1)
    width: int = option(128, minimum=1)
    dropout: float = option(0.1, "the photos training split is ~4.5k grids: the prior sees each one many times",
                            minimum=0)
    steps: int = option(500, minimum=1)
    batch_size: int = option(64, "grids per step", minimum=1)
    lr: float = option(3e-4, above=0)
    weight_decay: float = option(0.01, "on the weight matrices only, as nanoGPT does", minimum=0)
    warmup_steps: int = option(100, minimum=0)
    samples: int = option(1000, "images generated for gFID", minimum=1)
    temperature: float = option(1.0, above=0)
    top_k: int | None = option(None, "None: sample from the full distribution", minimum=1)
    seed: int = option(0, minimum=0)

    def to_dict(self) -> dict:
        return asdict(self)


def prior_config(spec) -> PriorConfig:
    """The run's prior settings: spec.prior_options over the defaults, seeded by the run's seed unless set."""
    return build(PriorConfig, {"seed": spec.seed, **spec.prior_options}, "prior option(s)", prefix="prior option ")


# --- the prior: a small GPT over raster-ordered codes ----------------------------------------------------------

class KVCache:
    """Keys and values of the positions seen so far, for sampling one token at a time."""

    def __init__(self, length: int):
        self.k = self.v = None  # (B, nh, length, hd), allocated at the first token in its dtype (autocast's)
        self.max_length, self.length = length, 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:  # k, v: (B, nh, 1, hd)
        if self.k is None:
            b, nh, _, hd = k.shape
            self.k, self.v = k.new_zeros(b, nh, self.max_length, hd), v.new_zeros(b, nh, self.max_length, hd)
        t = self.length
        self.k[:, :, t:t + 1] = k
        self.v[:, :, t:t + 1] = v
        self.length = t + 1
        return self.k[:, :, :t + 1], self.v[:, :, :t + 1]  # (B, nh, t+1, hd)


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        assert width % heads == 0, f"width {width} is not divisible by heads {heads}"
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:  # x: (B, T, C)
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (a.view(b, t, self.heads, c // self.heads).transpose(1, 2) for a in (q, k, v))  # (B, nh, T, hd)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:
            # one new token, the latest position: it may attend to every cached one, so no mask is needed
            assert t == 1, "the cache takes one token at a time"
            k, v = cache.append(k, v)
            y = F.scaled_dot_product_attention(q, k, v)
        y = y.transpose(1, 2).reshape(b, t, c)  # (B, T, C)
        return self.resid_dropout(self.proj(y))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, dropout)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width),
                                 nn.Dropout(dropout))

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class CodePrior(nn.Module):
    """p(c_1..c_T) = prod_t p(c_t | c_<t) over the T = H*W codes of a grid in raster order; a grid (H, W, D) of
    D codes per position is T = H*W*D tokens, depth innermost.

    The input sequence is [start, c_1, ..., c_{T-1}] (the start token is index K*D); position t predicts c_{t+1}.
    The input token of a code k at level i is i*K + k, so each level has its own embeddings; the output is always
    over the K codes of the level the position predicts (its level is t mod D, known from the position).
    """

    def __init__(self, codebook_size: int, grid: tuple[int, ...], layers: int, heads: int, width: int,
                 dropout: float = 0.0):
        super().__init__()
        self.codebook_size, self.grid, self.heads = codebook_size, tuple(grid), heads
        self.depth = grid[2] if len(grid) == 3 else 1
        self.length = math.prod(grid)
        self.start_token = codebook_size * self.depth
        # token offset of each position's level: 0 everywhere for one code per position
        self.register_buffer("level_offset", torch.arange(self.length) % self.depth * codebook_size, persistent=False)
        self.tok_emb = nn.Embedding(codebook_size * self.depth + 1, width)  # the K codes of each level, the start
        self.pos_emb = nn.Embedding(self.length, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, codebook_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def inputs(self, codes: Tensor) -> Tensor:
        """codes (B, T) -> the shifted input [start, c_1, ..., c_{T-1}] (B, T), each code offset by its level."""
        start = codes.new_full((codes.shape[0], 1), self.start_token)
        return torch.cat([start, (codes + self.level_offset)[:, :-1]], dim=1)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens (B, T') int64, T' <= T, starting with the start token -> logits (B, T', K) for the next code."""
        t = tokens.shape[1]
        x = self.drop(self.tok_emb(tokens) + self.pos_emb.weight[:t])  # (B, T', C)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def nll(self, codes: Tensor) -> Tensor:
        """codes (B, H, W) or (B, H, W, D) -> the mean negative log-likelihood per code, in nats (scalar, float32)."""
        codes = codes.flatten(1)  # (B, T), raster order, depth innermost
        logits = self(self.inputs(codes))  # (B, T, K)
        return F.cross_entropy(logits.float().flatten(0, 1), codes.flatten())

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, top_k: int | None = None) -> Tensor:
        """n grids (n, *grid) int64 in [0, K), drawn token by token from the global RNG of their device."""
        device = self.pos_emb.weight.device
        caches = [KVCache(self.length) for _ in self.blocks]
        token = torch.full((n, 1), self.start_token, dtype=torch.long, device=device)  # the start token
        codes = []
        for t in range(self.length):
            x = self.tok_emb(token) + self.pos_emb.weight[t]  # (n, 1, C)
            for block, cache in zip(self.blocks, caches):
                x = block(x, cache)
            logits = self.head(self.ln_f(x))[:, -1].float() / temperature  # (n, K)
            if top_k is not None and top_k < logits.shape[1]:
                kth = logits.topk(top_k, dim=1).values[:, -1:]  # (n, 1)
                logits = logits.masked_fill(logits < kth, float("-inf"))
            # the exponential race (Gumbel-max): an exact categorical draw with no host sync, unlike multinomial
            race = torch.empty_like(logits).exponential_(1.0)
            code = (logits.softmax(dim=1) / race).argmax(dim=1, keepdim=True)  # (n, 1)
            codes.append(code)
            token = code + self.level_offset[t]  # the next input: this code, embedded at its level
        return torch.cat(codes, dim=1).view(n, *self.grid)


# --- stage 2 -----------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    """Run a block from a fixed RNG state and restore the caller's CPU (and this CUDA device's) RNG after it."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def code_grids(model, images: Tensor, batch_size: int = 500,
               autocast: Autocast = contextlib.nullcontext) -> Tensor:
    """The frozen stage-1 model's codes of a uint8 split (N, 3, H, W) -> int64 (N, h, w), or (N, h, w, D) for a
    method with D codes per position, on the model's device.

    The model runs in eval mode (as in evaluation) and is left as it was.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    grids = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(device)
        with autocast():
            grids.append(model.quantizer(model.encode(model.preprocess(batch))).indices)
    model.train(was_training)
    return torch.cat(grids).long()


@torch.no_grad()
def bits_per_code(prior: CodePrior, grids: Tensor, batch_size: int = 500,
                  autocast: Autocast = contextlib.nullcontext) -> float:
    """The prior's mean negative log-likelihood of grids (N, H, W), in bits per code token (one host sync)."""
    was_training = prior.training
    prior.eval()
    total = torch.zeros((), dtype=torch.float64, device=grids.device)
    for start in range(0, len(grids), batch_size):
        batch = grids[start:start + batch_size]
        with autocast():
            total += prior.nll(batch).double() * len(batch)
    prior.train(was_training)
    return float(total) / len(grids) / math.log(2)


def train_prior(grids: Tensor, codebook_size: int, config: PriorConfig, device: torch.device | str,
                autocast: Autocast = contextlib.nullcontext,
                held_out: Tensor | None = None) -> tuple[CodePrior, float | None]:
    """Train a CodePrior on grids (N, H, W) or (N, H, W, D) int64 -> (the prior in eval mode, bits per code on
    held_out or None).

    Initialization and batches come from config.seed; the caller's RNG state is left untouched.
    """
    device = torch.device(device)
    grids = grids.to(device)
    with seeded(config.seed, device):
        prior = CodePrior(codebook_size, tuple(grids.shape[1:]), config.layers, config.heads, config.width,
                          config.dropout).to(device)  # initialized on the CPU RNG: the same on every device
        decay = [p for p in prior.parameters() if p.dim() >= 2]
        no_decay = [p for p in prior.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}],
                                      lr=config.lr, betas=(0.9, 0.95))
        prior.train()
        for step in range(config.steps):
            for group in optimizer.param_groups:
                group["lr"] = config.lr * warmup_cosine(step, config.warmup_steps, config.steps, floor=0.1)
            batch = grids[torch.randint(len(grids), (config.batch_size,), device=device)]  # (B, H, W)
            with autocast():
                loss = prior.nll(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(prior.parameters(), 1.0)
            optimizer.step()
    prior.eval()
    held_out_bits = None if held_out is None else bits_per_code(prior, held_out.to(device), autocast=autocast)
    return prior, held_out_bits


@torch.no_grad()
def decode_grids(model, grids: Tensor, batch_size: int = 500,
                 autocast: Autocast = contextlib.nullcontext) -> Tensor:
    """Code grids (N, h, w) or (N, h, w, D) -> uint8 images (N, 3, H, W) on the CPU, through decode_indices and
    the decoder."""
    was_training = model.training
    model.eval()
    images = []
    for start in range(0, len(grids), batch_size):
        with autocast():
            x = model.decode(model.quantizer.decode_indices(grids[start:start + batch_size]))
        images.append(to_uint8(model.postprocess(x)).cpu())
    model.train(was_training)
    return torch.cat(images)


def sample_images(model, prior: CodePrior, n: int, config: PriorConfig, device: torch.device | str,
                  autocast: Autocast = contextlib.nullcontext, batch_size: int = 500) -> Tensor:
    """n images drawn from the prior and decoded by the stage-1 model: uint8 (n, 3, H, W) on the CPU.

    Reproducible from config.seed (a stream apart from training's); the caller's RNG state is left untouched.
    """
    device = torch.device(device)
    prior.eval()
    images = []
    with seeded(config.seed + 1, device):
        for start in range(0, n, batch_size):
            with autocast():
                grids = prior.sample(min(batch_size, n - start), config.temperature, config.top_k)
            images.append(decode_grids(model, grids, batch_size, autocast))
    return torch.cat(images)


def can_decode_indices(model, device: torch.device) -> str | None:
    """None if the quantizer can map code indices back to its output, else the reason it cannot."""
    depth = getattr(model.quantizer, "code_depth", 1)
    try:
        model.quantizer.decode_indices(torch.zeros(1, 1, 1, *([depth] if depth > 1 else []), dtype=torch.long,
                                                   device=device))
    except NotImplementedError:
        return (f"{type(model.quantizer).__name__} cannot decode from code indices (decode_indices is not "
                "implemented), so prior samples cannot be turned into images")
    return None


def run_stage2(model, data, codebook_size: int, config: PriorConfig, device: torch.device | str,
               autocast: Autocast = contextlib.nullcontext, batch_size: int = 500) -> tuple[Tensor | None, dict]:
    """Stage 2 of a run: grids of data.train (and data.val), a prior trained on them, config.samples images.

    -> (samples uint8 (config.samples, 3, H, W) on the CPU, or None; info). info holds prior_bits_per_code
    (held-out: data.val's grids), prior_train_bits_per_code (as many of the training grids), the prior's
    size, its config and timings; and null_reason, the reason samples is None, when it is.
    The prior is trained even when samples cannot be decoded: bits per code does not need the decoder.
    """
    device = torch.device(device)
    started = time.perf_counter()
    with seeded(config.seed, device):  # the quantizer's forward may draw random numbers (Gumbel noise in train mode)
        train_grids = code_grids(model, data.train, batch_size, autocast)
        val_grids = code_grids(model, data.val, batch_size, autocast)
    grids_s = time.perf_counter() - started

    started = time.perf_counter()
    prior, held_out_bits = train_prior(train_grids, codebook_size, config, device, autocast, held_out=val_grids)
    train_bits = bits_per_code(prior, train_grids[:len(val_grids)], batch_size, autocast)  # overfitting check
    train_s = time.perf_counter() - started

    info = {
        "prior_bits_per_code": held_out_bits,
        "prior_train_bits_per_code": train_bits,
        "prior_uniform_bits_per_code": math.log2(codebook_size),
        "prior_params": sum(p.numel() for p in prior.parameters()),
        "prior_config": config.to_dict(),
        "prior_grid": list(train_grids.shape[1:]),
        "prior_train_grids": len(train_grids),
        "prior_held_out_grids": len(val_grids),
        "prior_grids_s": grids_s,
        "prior_train_s": train_s,
    }
    reason = can_decode_indices(model, device)
    if reason is not None:
        info["null_reason"] = reason
        return None, info
    started = time.perf_counter()
    samples = sample_images(model, prior, config.samples, config, device, autocast, batch_size)
    info["prior_sample_s"] = time.perf_counter() - started
    return samples, info
