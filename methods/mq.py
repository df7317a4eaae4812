"""Meta-Quantization (Qin and Zhang, ICML 2025, "Learning to Quantize for Training Vector-Quantized Networks").

`mq`:     the codebook is generated, C = h_phi(E), from a learned (K, h) table E by a small hyper-net h_phi, and
          recomputed at every forward pass, so one update of phi moves every code, used or not. The encoder
          output (which the encoder's own 1x1 convolution, the authors' `quant_conv`, has projected to the code
          dimension) passes a LayerNorm (part of the autoencoder), then the nearest-code search (squared L2)
          with the straight-through estimator. The aux loss is
          rate * (commitment_weight |z - sg(e)|^2 + codebook_weight |e - sg(z)|^2).
          Training is bi-level (DESIGN.md section 6): the autoencoder theta takes the standard step on every
          batch; every `outer_every` steps (E, phi) take one SGD step on the task loss of a further batch
          (ctx.draw_batch()), through the hypergradient
              g_phi = d_phi L_outer + [grad_phi L_inner(theta - eps v) - grad_phi L_inner(theta + eps v)] / (2 eps),
              v = grad_theta L_outer,  eps = fd_radius / |v|,
          evaluated at the already-updated theta, not multiplied by the inner learning rate, the inner step
          kept: as the authors' code does. With `outer_accum` = A the A evaluations are averaged into one step.
          `outer_micro_batch` = m: each evaluation uses m images of the outer batch and the last m images of
          the step's batch for the finite difference, as the authors' evaluations do under their gradient
          accumulation (their micro-batch of 16: batch 64 / accumulation 4); None: the whole batches.
`mq-alt`: the ablation without the meta-objective: the same generated codebook, trained by its direct gradient
          d_phi L_outer alone (only an encoder forward on the outer batch). `schedule="mq"`: mq's schedule, so
          it costs about what `ste` costs; `schedule="alt"`: the authors' `alt`, where the codebook is a problem
          of its own (no dependency on the autoencoder's) evaluated at every one of their micro-steps, with
          their accumulation: here, at every step (their outer_accum micro-steps), `outer_accum` evaluations
          averaged into one SGD step, so outer_accum x more codebook steps than `mq` takes at outer_every=1.
          Their code also runs the whole generator on that batch; only the encoder's output reaches the
          codebook's gradient, so only the encoder runs here.

Why the finite difference is not zero although autograd says the mixed derivative is: every path from phi to
theta in the task loss passes a stop-gradient (decoder input z + sg(e - z), commitment term with sg(e),
codebook term with sg(z)). grad_phi L_inner = (2 rate codebook_weight / N) sum_i (d e_{k_i}/d phi)^T (e_{k_i} - z_i)
still depends on theta through the *value* of z = LN(enc_theta(x)); the finite difference measures that
dependence along v. Its exact counterpart (`hypergrad="jvp"`) is
    +(2 rate codebook_weight / N) sum_i (d e_{k_i}/d phi)^T (J_z v)_i,
a Jacobian-vector product through the encoder (valid while no code assignment changes within eps).

Measurements (issue 18): the finite difference is a fair stand-in for the jvp only while no code assignment changes
within theta +- eps v. Every outer evaluation records, on the device (no host sync per step), under data
parallelism for the global batch (the per-rank vectors averaged over the ranks before their norms are taken):
    flip_fraction  the fraction of the inner batch's rows whose nearest code at theta + eps v or at theta - eps v
                   differs from their code at theta (the two codes the finite difference searches, plus one extra
                   no-grad encoder forward at theta: the one encoder pass the measurement adds to every evaluation)
    darts_norm     |darts term|, the L2 norm over all of (E, phi)
    direct_norm    |d_phi L_outer|
    jvp_norm       |jvp term|
    darts_vs_jvp   |darts - jvp| / |jvp|
With hypergrad="darts", flip_fraction, darts_norm and direct_norm are measured at every evaluation; jvp_norm and
darts_vs_jvp cost a forward-mode pass through the encoder (the jvp term), taken only every `probe_every`
evaluations (the first one included; 0: never). With hypergrad="jvp", jvp_norm and direct_norm are measured at
every evaluation, and the probe computes the darts term and its code searches: darts_norm, flip_fraction and
darts_vs_jvp are probe measurements there. mq-alt (no hypergradient term) records direct_norm alone. The extra
passes restore the model's buffers (BatchNorm running statistics) and the random number generators' states
afterwards, and leave theta and the terms the update uses untouched: the update is the one without measurement,
bit for bit. interval_stats()
and run_stats() give the means; both accumulators are part of training_state().

After training the hyper-net can be dropped: `export_codebook()` materializes C and `export_quantizer()` builds a
plain `ste-ln` module with the same LayerNorm and fixed codebook that gives identical outputs.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn
from torch.profiler import record_function

from methods import collective
from methods.base import (
    Quantizer, QuantizerOutput, StepResult, TrainContext, nearest_code, standard_step, to_rows,
)
from methods.registry import MethodError, register
from methods.schedules import warmup_cosine
from methods.ste import ChannelLayerNorm, StraightThroughVQ, straight_through_vq

HYPER_NETS = ("identity", "linear", "mlp", "mlp-tanh", "basis")
HYPERGRADS = ("darts", "jvp")
PROBE_EVERY = 10  # mq's default probe_every: the jvp probe costs about an outer evaluation's hypergradient phase
SCHEDULES = ("mq", "alt")  # mq-alt's: mq's own, or the authors' `alt`


def own_share(rows: Tensor) -> Tensor:
    """This rank's contiguous equal share of rows every rank holds (all of them in one process)."""
    n = rows.shape[0] // collective.world_size()
    return rows[collective.rank() * n:(collective.rank() + 1) * n]


# --- the generated codebook ------------------------------------------------------------------------------------

class HyperNetCodebook(nn.Module):
    """C = h_phi(E): a (K, h) latent table E through a hyper-net h_phi to the (K, d) codebook.

    `basis` (the authors' fifth hyper-net) turns the table around: E is a (d, d) table, a Linear(d -> K) maps it
    to (d, K), transposed to the (K, d) codebook: C = W E^T + b 1^T with W (K, d), b (K,), so every code is a
    combination of the d rows of E, plus a bias along the all-ones direction.
    Initialization as in the authors' code: E ~ N(0, 1) (nn.Embedding's default), PyTorch's default Linear init.
    """

    def __init__(self, codebook_size: int, dim: int, latent_dim: int, hyper_net: str, mlp_hidden: int):
        super().__init__()
        self.transposed = hyper_net == "basis"
        rows = dim if self.transposed else codebook_size
        self.latents = nn.Parameter(torch.randn(rows, latent_dim))  # E: (K, h), for basis (d, d)
        if hyper_net == "basis":
            self.net = nn.Linear(latent_dim, codebook_size)
        elif hyper_net == "identity":
            self.net = nn.Identity()
        elif hyper_net == "linear":
            self.net = nn.Linear(latent_dim, dim)
        elif hyper_net in ("mlp", "mlp-tanh"):
            activation = nn.ReLU() if hyper_net == "mlp" else nn.Tanh()
            self.net = nn.Sequential(nn.Linear(latent_dim, mlp_hidden), activation, nn.Linear(mlp_hidden, dim))
        else:
            raise MethodError(f"unknown hyper_net {hyper_net!r}; valid: {', '.join(HYPER_NETS)}")

    def forward(self) -> Tensor:  # -> (K, d)
        # the codes decide the argmin: generate them in full precision whatever the run's autocast
        with torch.autocast(self.latents.device.type, enabled=False):
            codes = self.net(self.latents)  # (K, d); for basis (d, K)
            return codes.t() if self.transposed else codes


@contextlib.contextmanager
def full_precision(device_type: str) -> Iterator[None]:
    """No autocast and, on CUDA, no TF32 in convolutions and matmuls.

    The finite difference compares two encoder outputs that differ by about 1e-4 relative (a parameter step of
    norm fd_radius = 0.01): bf16 (3.9e-3) and TF32 (4.9e-4 relative rounding) would drown that difference.
    """
    with torch.autocast(device_type, enabled=False):
        if device_type != "cuda":
            yield
            return
        cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
        # torch >= 2.9 has per-backend fp32_precision and rejects mixing it with the legacy allow_tf32 flags
        conv, flag = (cudnn.conv, "fp32_precision") if hasattr(cudnn, "conv") else (cudnn, "allow_tf32")
        off = "ieee" if flag == "fp32_precision" else False
        saved = getattr(conv, flag), getattr(matmul, flag)
        setattr(conv, flag, off)
        setattr(matmul, flag, off)
        try:
            yield
        finally:
            setattr(conv, flag, saved[0])
            setattr(matmul, flag, saved[1])


# --- the measurements ------------------------------------------------------------------------------------------

class RunningMeans:
    """Sums and counts of scalar measurements. The sums stay on the device (adding never syncs with the host); the
    counts are host integers (they follow the control flow). means() is the one host sync."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: dict[str, Tensor]) -> None:
        for key, value in values.items():
            value = value.detach()
            value = value.to(torch.float64) if value.device.type != "mps" else value.float()
            if key in self.sums:
                self.sums[key].add_(value)
            else:
                self.sums[key] = value.clone()
            self.counts[key] = self.counts.get(key, 0) + 1

    def means(self) -> dict[str, float]:
        if not self.sums:
            return {}
        keys = list(self.sums)
        values = torch.stack([self.sums[k] for k in keys]).tolist()  # one host sync
        return {k: v / self.counts[k] for k, v in zip(keys, values)}

    def state(self) -> dict:
        return {"sums": {k: v.clone() for k, v in self.sums.items()}, "counts": dict(self.counts)}

    @classmethod
    def from_state(cls, state: dict | None, device: torch.device) -> "RunningMeans":
        means = cls()
        if state is not None:
            means.sums = {k: v.to(device) for k, v in state["sums"].items()}
            means.counts = dict(state["counts"])
        return means


def list_norm(tensors: list[Tensor]) -> Tensor:
    """The L2 norm of a list of tensors taken as one vector (a 0-d tensor, on the device)."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))


@contextlib.contextmanager
def undisturbed(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Whatever runs inside leaves the model's buffers (BatchNorm running statistics, counters) and the random
    number generators (CPU and the device's) as they were: for the measurements' extra encoder passes."""
    buffers = list(model.buffers())
    saved = [b.clone() for b in buffers]
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield
    with torch.no_grad():
        for b, s in zip(buffers, saved):
            b.copy_(s)


# --- the adapter -------------------------------------------------------------------------------------------------

class MetaQuantizer(Quantizer):
    """Generated codebook, LayerNorm'd search, straight-through estimator; bi-level training (meta=True) or the
    direct-gradient ablation (meta=False). See the module docstring for the update rule."""

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        hyper_net: str,
        latent_dim: int,
        mlp_hidden: int,
        rate: float,
        commitment_weight: float,
        codebook_weight: float,
        outer_lr: float,
        outer_momentum: float,
        outer_warmup: float,
        outer_every: int,
        outer_accum: int,
        meta: bool,
        hypergrad: str = "darts",
        fd_radius: float = 0.01,
        hypergrad_fp32: bool = True,
        outer_micro_batch: int | None = None,
        schedule: str = "mq",
        probe_every: int = PROBE_EVERY,
    ):
        super().__init__()
        if hyper_net not in HYPER_NETS:
            raise MethodError(f"unknown hyper_net {hyper_net!r}; valid: {', '.join(HYPER_NETS)}")
        if hyper_net in ("identity", "basis") and latent_dim != dim:
            # identity: E is the codebook; basis: the authors' table is Embedding(d, d)
            raise MethodError(f"hyper_net={hyper_net!r} needs latent_dim == code dim; pass latent_dim={dim} "
                              f"(got {latent_dim})")
        if hypergrad not in HYPERGRADS:
            raise MethodError(f"unknown hypergrad {hypergrad!r}; valid: {', '.join(HYPERGRADS)}")
        if schedule not in SCHEDULES:
            raise MethodError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
        if schedule == "alt" and (meta or outer_every != 1):
            raise MethodError("schedule='alt' (the authors' alt: a codebook step at every step) is mq-alt's and "
                              f"needs outer_every=1 (got {outer_every})")
        if outer_micro_batch is not None and (isinstance(outer_micro_batch, bool)
                                              or not isinstance(outer_micro_batch, int) or outer_micro_batch <= 0):
            raise MethodError(f"option outer_micro_batch must be a positive integer or None, got {outer_micro_batch!r}")
        for name, value in (("latent_dim", latent_dim), ("mlp_hidden", mlp_hidden),
                            ("outer_every", outer_every), ("outer_accum", outer_accum)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise MethodError(f"option {name} must be a positive integer, got {value!r}")
        if isinstance(probe_every, bool) or not isinstance(probe_every, int) or probe_every < 0:
            raise MethodError(f"option probe_every must be a non-negative integer (0: no probe), got {probe_every!r}")
        if not 0.0 <= outer_warmup < 1.0:
            raise MethodError(f"option outer_warmup is a fraction of the run in [0, 1), got {outer_warmup!r}")
        if not (outer_lr > 0 and fd_radius > 0 and 0 <= outer_momentum < 1):
            raise MethodError("options need outer_lr > 0, fd_radius > 0 and 0 <= outer_momentum < 1")
        self.dim, self.codebook_size = dim, codebook_size
        self.hyper_net, self.latent_dim = hyper_net, latent_dim
        self.rate = rate
        self.commitment_weight, self.codebook_weight = commitment_weight, codebook_weight
        self.outer_lr, self.outer_momentum, self.outer_warmup = outer_lr, outer_momentum, outer_warmup
        self.outer_every, self.outer_accum = outer_every, outer_accum
        self.meta, self.hypergrad = meta, hypergrad
        self.fd_radius, self.hypergrad_fp32 = fd_radius, hypergrad_fp32
        self.outer_micro_batch, self.schedule = outer_micro_batch, schedule
        self.probe_every = probe_every
        self.pre = ChannelLayerNorm(dim)  # theta: trained by the autoencoder's optimizer
        self.codebook_net = HyperNetCodebook(codebook_size, dim, latent_dim, hyper_net, mlp_hidden)  # (E, phi)
        # the training state outside state_dict (setup_training builds the optimizer)
        self.outer_optimizer: torch.optim.SGD | None = None
        self.total_steps = 0
        self.outer_steps = 0  # hyper-net updates taken
        self.accum_count = 0  # outer evaluations summed into accum_grads since the last update
        self.accum_grads: list[Tensor] | None = None
        # the measurements (module docstring); `measure = False` turns them off (they never change the update)
        self.measure = True
        self.evaluations = 0  # outer evaluations measured
        self.probes = 0  # of which probed
        self.run_means, self.interval_means = RunningMeans(), RunningMeans()

    # --- the quantizer ------------------------------------------------------------------------------------------

    def codebook(self) -> Tensor:
        """The generated codebook C = h_phi(E), (K, d), with its graph to (E, phi)."""
        return self.codebook_net()

    def forward(self, z: Tensor) -> QuantizerOutput:  # z: (B, D, H, W)
        z = self.pre(z)
        quantized, indices, aux, err = straight_through_vq(
            z, self.codebook(), self.rate * self.codebook_weight, self.rate * self.commitment_weight
        )
        return QuantizerOutput(quantized, indices, aux, err)

    def decode_indices(self, indices: Tensor) -> Tensor:
        return self.codebook()[indices].permute(0, 3, 1, 2)  # (B, H, W) -> (B, D, H, W)

    def method_parameters(self) -> list[nn.Parameter]:
        return list(self.codebook_net.parameters())

    # --- dropping the hyper-net -----------------------------------------------------------------------------------

    @torch.no_grad()
    def export_codebook(self) -> Tensor:
        return self.codebook().detach().clone()

    @torch.no_grad()
    def export_quantizer(self) -> StraightThroughVQ:
        """A plain `ste-ln` quantizer (same LayerNorm, fixed codebook C) with identical indices,
        quantized maps and aux loss; the hyper-net and E are not needed at inference."""
        weight = self.codebook_net.latents
        plain = StraightThroughVQ(self.dim, self.codebook_size, self.rate * self.codebook_weight,
                                  self.rate * self.commitment_weight, layernorm=True)
        plain = plain.to(device=weight.device, dtype=weight.dtype)
        plain.pre.load_state_dict(self.pre.state_dict())
        plain.codebook.weight.copy_(self.export_codebook())
        return plain

    def export_note(self) -> dict:
        return {"codebook_exportable": True, "codebook_shape": [self.codebook_size, self.dim],
                "generated_by": f"{self.hyper_net} hyper-net over a {self._table()} table",
                "plain_equivalent": "ste-ln with the exported codebook (MetaQuantizer.export_quantizer)"}

    def _table(self) -> str:
        rows, cols = self.codebook_net.latents.shape
        return f"({rows}, {cols})"

    # --- training: setup and state ----------------------------------------------------------------------------

    def setup_training(self, total_steps: int) -> None:
        world = collective.world_size()
        if self.outer_micro_batch is not None and self.outer_micro_batch % world:
            # a micro-batch is m rows of the GLOBAL batch, each rank evaluating its contiguous m / world of them
            raise MethodError(f"option outer_micro_batch={self.outer_micro_batch} does not split into {world} equal "
                              f"rank slices; pass a multiple of {world}, or run on a number of ranks that divides it")
        self.total_steps = total_steps
        self.outer_optimizer = torch.optim.SGD(self.method_parameters(), lr=self.outer_lr,
                                               momentum=self.outer_momentum)
        self.outer_steps, self.accum_count, self.accum_grads = 0, 0, None
        self.evaluations, self.probes = 0, 0
        self.run_means, self.interval_means = RunningMeans(), RunningMeans()

    def training_state(self) -> dict:
        return {"outer_optimizer": self._outer().state_dict(), "outer_steps": self.outer_steps,
                "accum_count": self.accum_count,
                "accum_grads": None if self.accum_grads is None else [g.clone() for g in self.accum_grads],
                "measurements": {"evaluations": self.evaluations, "probes": self.probes,
                                 "run": self.run_means.state(), "interval": self.interval_means.state()}}

    def load_training_state(self, state: dict) -> None:
        self._outer().load_state_dict(state["outer_optimizer"])
        self.outer_steps, self.accum_count = state["outer_steps"], state["accum_count"]
        grads = state["accum_grads"]
        params = self.method_parameters()
        self.accum_grads = None if grads is None else [g.to(p) for g, p in zip(grads, params)]
        measured = state.get("measurements")  # absent from checkpoints written before the measurements
        device = params[0].device
        self.evaluations = 0 if measured is None else measured["evaluations"]
        self.probes = 0 if measured is None else measured["probes"]
        self.run_means = RunningMeans.from_state(None if measured is None else measured["run"], device)
        self.interval_means = RunningMeans.from_state(None if measured is None else measured["interval"], device)

    def interval_stats(self) -> dict[str, float]:
        """The means of the measurements since the previous call (module docstring), then reset."""
        means = self.interval_means.means()
        self.interval_means = RunningMeans()
        return means

    def run_stats(self) -> dict[str, float]:
        """The means over the whole run so far, and the numbers of measured outer evaluations and of probes."""
        if not self.evaluations:
            return {}
        counts = {"evaluations": float(self.evaluations)}
        if self.meta:
            counts["probes"] = float(self.probes)
        return {**self.run_means.means(), **counts}

    def _outer(self) -> torch.optim.SGD:
        if self.outer_optimizer is None:
            raise RuntimeError("call setup_training(total_steps) before training an MQ quantizer")
        return self.outer_optimizer

    def outer_lr_at(self, step: int) -> float:
        """Linear warm-up over outer_warmup of the run, then cosine decay to zero at total_steps (inner steps)."""
        if self.total_steps <= 0:  # no run length given: no schedule
            return self.outer_lr
        warmup = self.outer_warmup * self.total_steps
        return self.outer_lr * warmup_cosine(step, warmup, self.total_steps, warmup_from_zero=True)

    # --- training: the bi-level step --------------------------------------------------------------------------

    def training_step(self, ctx: TrainContext, images: Tensor) -> StepResult:
        with record_function("mq/inner"):
            result = standard_step(ctx, images)  # exactly ste's step on exactly ste's batch
            for p in self.method_parameters():  # the codebook term's gradient on (E, phi) is not the outer one
                p.grad = None
        if self.schedule == "alt":  # the authors' alt: outer_accum evaluations and one codebook step, every step
            with record_function("mq/outer"):
                for outer_images in self.outer_batches(ctx, self.outer_accum):
                    self.accumulate(self.measured_direct_gradient(ctx, outer_images))
                self.outer_update(ctx.step)
        elif (ctx.step + 1) % self.outer_every == 0:
            self.accumulate(self.outer_gradient(ctx, self.inner_micro_batch(images)))
            if self.accum_count == self.outer_accum:
                with record_function("mq/outer"):
                    self.outer_update(ctx.step)
        return result

    def _micro(self, available: int) -> int:
        n = self.outer_micro_batch
        if n > available:
            raise MethodError(f"option outer_micro_batch={n} is larger than the batch of {available} images; "
                              f"pass outer_micro_batch <= batch size (the authors': batch / accumulation)")
        return n

    def inner_micro_batch(self, images: Tensor) -> Tensor:
        """The inner batch of the finite difference: the whole step's batch, or with outer_micro_batch = m its
        last m images (the authors' finite difference runs on the last micro-batch their generator saw). Under
        data parallelism `images` is this rank's slice: the m rows are the global batch's, this rank's share of them
        its contiguous m / world."""
        if self.outer_micro_batch is None:
            return images
        whole = collective.all_gather_rows(images)  # (B, 3, H, W): the one-process batch
        return own_share(whole[whole.shape[0] - self._micro(whole.shape[0]):])

    def outer_batches(self, ctx: TrainContext, count: int) -> list[Tensor]:
        """`count` outer batches from ctx.draw_batch(): whole drawn batches, or with outer_micro_batch = m
        consecutive m-image slices of as few drawn batches as give `count` of them (the rest of the last one is
        not used)."""
        batches: list[Tensor] = []
        while len(batches) < count:
            drawn = ctx.draw_batch()
            if self.outer_micro_batch is None:
                batches.append(drawn)
                continue
            whole = collective.all_gather_rows(drawn)  # the one-process drawn batch (this rank's slice: drawn)
            m = self._micro(whole.shape[0])
            batches += [own_share(whole[i:i + m]) for i in range(0, whole.shape[0] - m + 1, m)]
        return batches[:count]

    def outer_gradient(self, ctx: TrainContext, inner_images: Tensor) -> list[Tensor]:
        """The gradient (E, phi) receive for one outer evaluation at the current theta, one tensor per
        method parameter. Draws one outer batch (outer_batches)."""
        phi = self.method_parameters()
        (outer_images,) = self.outer_batches(ctx, 1)
        if not self.meta:
            with record_function("mq/outer"):
                return self.measured_direct_gradient(ctx, outer_images)
        theta = self.theta(ctx)
        with record_function("mq/outer"):
            loss, _ = ctx.loss_fn(outer_images)
            grads = torch.autograd.grad(loss, [*theta, *phi], allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip([*theta, *phi], grads)]
            v, direct = grads[: len(theta)], grads[len(theta):]
            # v = grad_theta L_outer over the GLOBAL outer batch, before eps = fd_radius / |v| is taken from it
            collective.all_reduce_mean_list_(v)
        codes = None
        with record_function("mq/hypergrad"):
            if self.hypergrad == "darts":
                term, codes = self.darts_with_codes(ctx, inner_images, v, at_theta=self.measure)
            else:
                term = self.jvp_term(ctx, inner_images, v)
        if self.measure:
            with record_function("mq/measure"):
                self.measure_evaluation(ctx, inner_images, v, direct, term, codes)
        return [d + t for d, t in zip(direct, term)]

    # --- the measurements (module docstring) ------------------------------------------------------------------

    def measured_direct_gradient(self, ctx: TrainContext, outer_images: Tensor) -> list[Tensor]:
        """mq-alt's outer evaluation, direct_gradient, with its norm recorded."""
        direct = self.direct_gradient(ctx, outer_images)
        if self.measure:
            with record_function("mq/measure"):
                (direct_global,) = self.global_vectors(direct)
                self.record({"direct_norm": list_norm(direct_global)}, probe=False)
        return direct

    @staticmethod
    def global_vectors(*vectors: list[Tensor]) -> list[list[Tensor]]:
        """Each list of per-rank tensors (means over the rank's slice) as the global batch's: copies averaged over
        the ranks in one all-reduce (the originals, which the update uses, untouched); in one process, as they are."""
        if not collective.distributed():
            return list(vectors)
        copies = [[t.detach().clone() for t in vector] for vector in vectors]
        collective.all_reduce_mean_list_([t for vector in copies for t in vector])
        return copies

    def measure_evaluation(self, ctx: TrainContext, inner_images: Tensor, v: list[Tensor], direct: list[Tensor],
                           term: list[Tensor], codes: tuple[Tensor, Tensor, Tensor] | None) -> None:
        """Records one outer evaluation of mq; `codes` (at theta, theta + eps v, theta - eps v) come with a darts
        term. The probe's extra pass runs undisturbed (buffers and generators restored)."""
        probe = self.probe_every > 0 and self.evaluations % self.probe_every == 0
        darts = jvp = None
        if self.hypergrad == "darts":
            darts = term
            if probe:
                try:
                    with undisturbed(ctx.model, direct[0].device):
                        jvp = self.jvp_term(ctx, inner_images, v)
                except (RuntimeError, NotImplementedError) as error:  # no forward-mode rule for a layer (the
                    if "not implemented" not in str(error):  # VQGAN's CPU flash attention): no jvp probe, said so
                        raise
                    self.probe_every, jvp = 0, None
        else:
            jvp = term
            if probe:
                with undisturbed(ctx.model, direct[0].device):
                    darts, codes = self.darts_with_codes(ctx, inner_images, v, at_theta=True)
        local = {"direct": direct, "darts": darts, "jvp": jvp}
        if codes is not None:
            center, plus, minus = codes
            flips = ((plus != center) | (minus != center)).to(direct[0].dtype).mean()
            local["flips"] = [flips]  # the ranks' slices are equal: the mean of their fractions is the global one
        local = {k: t for k, t in local.items() if t is not None}
        vectors = dict(zip(local, self.global_vectors(*local.values())))
        values = {"direct_norm": list_norm(vectors["direct"])}
        if "flips" in vectors:
            values["flip_fraction"] = vectors["flips"][0]
        if "darts" in vectors:
            values["darts_norm"] = list_norm(vectors["darts"])
        if "jvp" in vectors:
            values["jvp_norm"] = list_norm(vectors["jvp"])
            if "darts" in vectors:
                difference = list_norm(torch._foreach_sub(vectors["darts"], vectors["jvp"]))
                values["darts_vs_jvp"] = difference / values["jvp_norm"].clamp_min(torch.finfo(difference.dtype).tiny)
        self.record(values, probe)

    def record(self, values: dict[str, Tensor], probe: bool) -> None:
        self.run_means.add(values)
        self.interval_means.add(values)
        self.evaluations += 1
        self.probes += probe

    def accumulate(self, grads: list[Tensor]) -> None:
        # data parallelism: each evaluation's gradient (direct + darts/jvp term, each a mean over the rank's slice)
        # is averaged over the ranks as it is accumulated, so the running sum, which a checkpoint between two
        # evaluations keeps, is one process's on every rank, and so are phi's update and its momentum
        grads = collective.all_reduce_mean_list_([g.detach().clone() for g in grads])
        if self.accum_grads is None:
            self.accum_grads = grads
        else:
            torch._foreach_add_(self.accum_grads, grads)
        self.accum_count += 1

    def outer_update(self, step: int) -> None:
        optimizer = self._outer()
        for group in optimizer.param_groups:
            group["lr"] = self.outer_lr_at(step)
        for p, g in zip(self.method_parameters(), self.accum_grads):
            p.grad = g.div_(self.accum_count)
        optimizer.step()
        for p in self.method_parameters():
            p.grad = None
        self.accum_grads, self.accum_count = None, 0
        self.outer_steps += 1

    # --- the gradients ----------------------------------------------------------------------------------------

    @staticmethod
    def theta(ctx: TrainContext) -> list[Tensor]:
        """The autoencoder's parameters: whatever the autoencoder optimizer trains."""
        return [p for group in ctx.optimizer.param_groups for p in group["params"] if p.requires_grad]

    def search_input(self, ctx: TrainContext, images: Tensor) -> Tensor:
        """z = LN(encode(x)), (B, d, h, w): what the nearest-code search sees; a function of theta only."""
        return self.pre(ctx.model.encode(ctx.model.preprocess(images)))

    @staticmethod
    def assign(codebook: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """The rows of sg(z) (B, d, h, w), (N, d) in at least fp32, and their nearest codes of sg(codebook), (N,)."""
        z = z.detach()
        rows = to_rows(z.float() if z.dtype in (torch.float16, torch.bfloat16) else z)  # (N, d)
        return rows, nearest_code(rows, codebook.detach().to(rows.dtype))

    @staticmethod
    def code_sums(codebook: Tensor, z: Tensor, values: Tensor | None = None,
                  assigned: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, int]:
        """Assign the rows of sg(z) (B, d, h, w) to their nearest codes of sg(codebook) (K, d); per code, the
        number of rows (K,) and the sum of their `values` (default: the rows themselves), (K, d). -> (counts,
        sums, rows). With these, the codebook term is a (K, d) expression (codebook_objective). `assigned`:
        assign(codebook, z), where the caller already has it."""
        rows, idx = MetaQuantizer.assign(codebook, z) if assigned is None else assigned
        values = rows if values is None else to_rows(values.detach()).to(rows.dtype)
        counts = torch.bincount(idx, minlength=codebook.shape[0]).to(rows.dtype)  # (K,)
        sums = torch.zeros(codebook.shape[0], rows.shape[1], dtype=rows.dtype, device=rows.device)
        return counts, sums.index_add_(0, idx, values), rows.shape[0]

    def codebook_objective(self, codebook: Tensor, counts: Tensor, sums: Tensor, rows: int) -> Tensor:
        """rate * codebook_weight * mean_i |e_{k_i} - sg(z_i)|^2, the only part of the task loss whose gradient
        reaches (E, phi), less its constant sum_i |z_i|^2:
            rate * codebook_weight / (N d) * sum_k (n_k |e_k|^2 - 2 e_k . s_k).
        Its gradient is exact, and it is linear in (counts, sums), so a difference of two terms is one call on
        the differences, with no gather of N codes and no cancellation of the large |z|^2 parts."""
        codebook = codebook.to(sums.dtype)
        energy = (counts[:, None] * codebook.pow(2)).sum() - 2 * (codebook * sums).sum()
        return self.rate * self.codebook_weight * energy / (rows * codebook.shape[1])

    def direct_gradient(self, ctx: TrainContext, outer_images: Tensor) -> list[Tensor]:
        """d_phi L_outer: only the codebook term depends on phi, so an encoder forward (no graph to theta) and the
        quantizer loss suffice; the decoder is not run."""
        with torch.no_grad(), ctx.autocast():
            z = self.search_input(ctx, outer_images)
        codebook = self.codebook()
        loss = self.codebook_objective(codebook, *self.code_sums(codebook, z))
        return list(torch.autograd.grad(loss, self.method_parameters()))

    def _precision(self, device: torch.device) -> contextlib.AbstractContextManager:
        return full_precision(device.type) if self.hypergrad_fp32 else contextlib.nullcontext()

    def darts_term(self, ctx: TrainContext, inner_images: Tensor, v: list[Tensor]) -> list[Tensor]:
        """[grad_phi L_inner(theta - eps v) - grad_phi L_inner(theta + eps v)] / (2 eps), eps = fd_radius / |v|.

        theta is perturbed in place and restored by copying the saved tensors (not by adding back), so no
        rounding drift accumulates over a run. Only the encoder runs, without a graph to theta.
        """
        return self.darts_with_codes(ctx, inner_images, v)[0]

    def darts_with_codes(self, ctx: TrainContext, inner_images: Tensor, v: list[Tensor], at_theta: bool = False
                         ) -> tuple[list[Tensor], tuple[Tensor, Tensor, Tensor] | None]:
        """darts_term, and with at_theta the inner rows' codes (at theta, theta + eps v, theta - eps v), each (N,):
        the codes at theta cost one more no-grad encoder forward, run undisturbed (buffers and generators
        restored), with the same codebook and precision as the two searches of the finite difference."""
        theta, phi = self.theta(ctx), self.method_parameters()
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(v)))  # stays on the device: no sync
        eps = self.fd_radius / norm.clamp_min(1e-12)
        step = torch._foreach_mul(v, eps)  # eps * v
        codebook = self.codebook()
        with torch.no_grad():
            saved = [p.detach().clone() for p in theta]
            with self._precision(norm.device):
                torch._foreach_add_(theta, step)
                z_plus = self.search_input(ctx, inner_images)
                torch._foreach_copy_(theta, saved)
                torch._foreach_sub_(theta, step)
                z_minus = self.search_input(ctx, inner_images)
                torch._foreach_copy_(theta, saved)
                if at_theta:
                    with record_function("mq/measure"), undisturbed(ctx.model, norm.device):
                        center = self.assign(codebook, self.search_input(ctx, inner_images))[1]
        # grad_phi is linear in the loss, and the loss in (counts, sums): one backward through the hyper-net
        # gives g(theta-) - g(theta+)
        minus, plus = self.assign(codebook, z_minus), self.assign(codebook, z_plus)
        counts_minus, sums_minus, rows = self.code_sums(codebook, z_minus, assigned=minus)
        counts_plus, sums_plus, _ = self.code_sums(codebook, z_plus, assigned=plus)
        difference = self.codebook_objective(codebook, counts_minus - counts_plus, sums_minus - sums_plus, rows)
        grads = torch.autograd.grad(difference, phi)
        codes = (center, plus[1], minus[1]) if at_theta else None
        return torch._foreach_div(list(grads), 2 * eps), codes

    def jvp_term(self, ctx: TrainContext, inner_images: Tensor, v: list[Tensor]) -> list[Tensor]:
        """The exact counterpart of darts_term: +(2 rate codebook_weight / N) sum_i (d e_{k_i}/d phi)^T (J_z v)_i.

        J_z v by the double-backward trick (module-agnostic: no functional_call over the harness's model):
        u -> J^T u is linear in u, so the gradient of <J^T u, v> with respect to u is J v.
        """
        theta, phi = self.theta(ctx), self.method_parameters()
        with self._precision(v[0].device):
            z = self.search_input(ctx, inner_images)
            u = torch.zeros_like(z, requires_grad=True)
            pulled = torch.autograd.grad(z, theta, grad_outputs=u, create_graph=True, allow_unused=True)
            used = [(g, w) for g, w in zip(pulled, v) if g is not None]
            if used:
                (jv,) = torch.autograd.grad([g for g, _ in used], u, grad_outputs=[w for _, w in used])
            else:
                jv = torch.zeros_like(z)
            codebook = self.codebook()
            # the term is linear in the codes' sums of J_z v: codebook_objective with no |e|^2 part and s = -Jv
            _, sums, rows = self.code_sums(codebook, z, values=jv)
            term = self.codebook_objective(codebook, torch.zeros_like(sums[:, 0]), -sums, rows)
        return list(torch.autograd.grad(term, phi))


# --- registration -------------------------------------------------------------------------------------------------
# mq and mq-alt spell out the same options on purpose: the registry reads a method's options from its signature, and
# mq-alt must not offer the hypergradient's; tests/test_mq.py checks that the shared ones keep the same defaults.

@register("mq", palette_slot=6, version=2,
          search_space={"outer_lr": (1e-5, 1e-4, 1e-3), "rate": (0.03, 0.1, 0.3)})  # 2: the authors' pre-search map
def mq(
    dim: int,
    codebook_size: int,
    hyper_net: str = "mlp-tanh",
    latent_dim: int = 32,
    mlp_hidden: int = 256,
    rate: float = 0.1,
    commitment_weight: float = 1.0,
    codebook_weight: float = 1.0,
    outer_lr: float = 1e-4,
    outer_momentum: float = 0.9,
    outer_warmup: float = 0.1,
    outer_every: int = 4,
    outer_accum: int = 1,
    hypergrad: str = "darts",
    fd_radius: float = 0.01,
    hypergrad_fp32: bool = True,
    outer_micro_batch: int | None = None,
    probe_every: int = PROBE_EVERY,
) -> MetaQuantizer:
    """Meta-Quantization. Defaults: the authors' code (hyper-net mlp-tanh, h = 32, hidden 256 as in their VQGAN
    setting; rate 0.1; both loss weights 1; outer SGD lr 1e-4, momentum 0.9; warm-up 10% then cosine; DARTS
    finite difference of radius 0.01). outer_every = 4 is ours (the compute ratio of their accumulation of 4);
    outer_micro_batch None (whole batches) is ours, the VQGAN presets set the authors' 16. probe_every (ours, a
    measurement only: it never changes the update): the jvp/darts comparison every probe_every outer evaluations,
    0 never (module docstring)."""
    return MetaQuantizer(
        dim, codebook_size, hyper_net=hyper_net, latent_dim=latent_dim, mlp_hidden=mlp_hidden, rate=rate,
        commitment_weight=commitment_weight, codebook_weight=codebook_weight, outer_lr=outer_lr,
        outer_momentum=outer_momentum, outer_warmup=outer_warmup, outer_every=outer_every, outer_accum=outer_accum,
        meta=True, hypergrad=hypergrad, fd_radius=fd_radius, hypergrad_fp32=hypergrad_fp32,
        outer_micro_batch=outer_micro_batch, probe_every=probe_every,
    )


@register("mq-alt", palette_slot=7, version=2,
          search_space={"outer_lr": (1e-5, 1e-4, 1e-3), "rate": (0.03, 0.1, 0.3)})  # 2: the authors' pre-search map
def mq_alt(
    dim: int,
    codebook_size: int,
    hyper_net: str = "mlp-tanh",
    latent_dim: int = 32,
    mlp_hidden: int = 256,
    rate: float = 0.1,
    commitment_weight: float = 1.0,
    codebook_weight: float = 1.0,
    outer_lr: float = 1e-4,
    outer_momentum: float = 0.9,
    outer_warmup: float = 0.1,
    outer_every: int = 4,
    outer_accum: int = 1,
    outer_micro_batch: int | None = None,
    schedule: str = "mq",
) -> MetaQuantizer:
    """The ablation without the meta-objective: `mq`'s codebook, direct gradient only; on `mq`'s schedule
    (schedule="mq", ours) or the authors' `alt` one (schedule="alt": outer_accum evaluations and one codebook
    step at every step; needs outer_every=1)."""
    return MetaQuantizer(
        dim, codebook_size, hyper_net=hyper_net, latent_dim=latent_dim, mlp_hidden=mlp_hidden, rate=rate,
        commitment_weight=commitment_weight, codebook_weight=codebook_weight, outer_lr=outer_lr,
        outer_momentum=outer_momentum, outer_warmup=outer_warmup, outer_every=outer_every, outer_accum=outer_accum,
        meta=False, outer_micro_batch=outer_micro_batch, schedule=schedule,
    )
