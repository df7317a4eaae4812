"""`python -m bench.perf` : training-step cost of every method, measured side by side in one process.

For each method, interleaved round by round with every other method so that machine noise hits all alike:
  - `harness`: steps of the real training loop (bench.train.Trainer.train),
  - `bare`:    the same model stepped by a plain hand-written loop,
  - `no-vq`:   the same encoder and decoder with no quantizer at all.
It prints median step times and the ratios method/no-vq, method/reference (`ste`), harness/bare, the split of a method's
time into its profiler-labelled phases (record_function names such as "mq/outer"), and with --memory the peak
memory of each method measured in a separate process (on the CPU the peak RSS never shrinks).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import copy
import json
import statistics
import subprocess
import sys
import time

import pandas as pd
import torch
from torch import Tensor

from bench.models import MODELS
from bench.spec import RunSpec
from bench.train import Trainer
from methods import Quantizer, QuantizerOutput, TrainContext, list_methods, reference_method


class NoQuantizer(Quantizer):
    """Passes z through unchanged: the autoencoder's own cost, the denominator of every method's overhead."""

    def __init__(self, dim: int, codebook_size: int):
        super().__init__()
        self.dim, self.codebook_size = dim, codebook_size

    def forward(self, z: Tensor) -> QuantizerOutput:
        zero = z.new_zeros(())
        return QuantizerOutput(z, torch.zeros(z.shape[0], *z.shape[2:], dtype=torch.long, device=z.device), zero, zero)


def perf_spec(method: str, args) -> RunSpec:
    return RunSpec(method=method, steps=10**6, eval_every=0, ckpt_every=0, batch_size=args.batch_size,
                   device=args.device, threads=args.threads, experiment="perf")


def make_trainer(spec: RunSpec) -> Trainer:
    trainer = Trainer(spec, "/nonexistent", "/nonexistent", progress=False)
    trainer.setup()
    return trainer


def bare_loop(trainer: Trainer, model=None):
    """A hand-written loop over a copy of the trainer's model: batches by slicing, the method's update rule
    (the shared standard_step unless the method brings its own), no schedule, no logging, no checkpoints."""
    model = model if model is not None else copy.deepcopy(trainer.model)
    optimizer = torch.optim.AdamW(model.autoencoder_parameters(), lr=trainer.spec.lr, betas=trainer.spec.betas)
    model.setup_training(trainer.spec.steps)
    model.quantizer.setup_training(trainer.spec.steps)
    train, batch_size = trainer.data.train, trainer.spec.batch_size
    ctx = TrainContext(model=model, loss_fn=model.task_loss, optimizer=optimizer,
                       draw_batch=lambda: train[:batch_size], total_steps=trainer.spec.steps)

    def run(n: int) -> None:
        for _ in range(n):
            start = ctx.step * batch_size % (len(train) - batch_size)
            images = train[start:start + batch_size]
            model.before_step(ctx.step)
            model.quantizer.training_step(ctx, images)
            model.after_step(images)
            ctx.step += 1
    return run


def timed(run, steps: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run(steps)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


@contextlib.contextmanager
def native_stderr_silenced():
    """The profiler's C++ side prints start/stop lines straight to file descriptor 2: park it meanwhile."""
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def phase_split(trainer: Trainer, steps: int) -> dict[str, float]:
    """Milliseconds per step of each record_function label ("family/phase") the method's step emits."""
    from torch.profiler import ProfilerActivity, profile

    with native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.train(trainer.step + steps)
    return {e.key: e.cpu_time_total / 1000 / steps for e in prof.key_averages()
            if "/" in e.key and not e.key.startswith(("aten::", "autograd::", "Optimizer"))}


def measure(methods: list[str], args) -> pd.DataFrame:
    """Every method's variants, timed round by round in one interleaved schedule: in each round every method
    runs every variant once, the order of the methods rotating from round to round, so slow spells of the
    machine and the first-in-round slot hit all methods alike. Ratios to the reference are medians of the per-round
    ratios (each measured seconds apart), step times are medians over rounds."""
    trainers, variants = {}, {}
    for method in methods:
        torch.manual_seed(0)
        trainer = trainers[method] = make_trainer(perf_spec(method, args))
        spec = trainer.spec
        no_vq_model = MODELS[spec.model].build(spec, NoQuantizer(spec.code_dim, spec.codebook_size)).to(trainer.device)
        variants[method] = {"harness": lambda n, t=trainer: t.train(t.step + n), "bare": bare_loop(trainer),
                            "no-vq": bare_loop(trainer, no_vq_model)}
        for run in variants[method].values():
            run(args.warmup)
    times = {method: {name: [] for name in variants[method]} for method in methods}
    for round_index in range(args.rounds):
        shift = round_index % len(methods)
        for method in methods[shift:] + methods[:shift]:
            for name, run in variants[method].items():
                times[method][name].append(timed(run, args.steps, trainers[method].device))
    frame = summarize(times, reference_method())
    frame.attrs["phases"] = {m: phase_split(trainers[m], args.steps) if args.phases else {} for m in methods}
    return frame


def summarize(times: dict[str, dict[str, list[float]]], reference: str | None) -> pd.DataFrame:
    """times[method][variant] = seconds per step, one entry per round. Step times are medians over rounds; every
    ratio is the median of the per-round ratios, so a slow spell of the machine divides out within its round."""
    def ratio(a: list[float], b: list[float]) -> float:
        return statistics.median(x / y for x, y in zip(a, b))

    rows = []
    for method, t in times.items():
        row = {"method": method, **{f"{name.replace('-', '_')}_ms": 1000 * statistics.median(v) for name, v in t.items()},
               "vs_no_vq": ratio(t["harness"], t["no-vq"]), "harness_vs_bare": ratio(t["harness"], t["bare"])}
        if reference in times:
            row[f"vs_{reference}"] = ratio(t["harness"], times[reference]["harness"])
        rows.append(row)
    return pd.DataFrame(rows).rename(columns={"harness_ms": "step_ms"})


def peak_memory_child(method: str, args) -> dict:
    """Run in a fresh process: a few training steps, then the peak memory of this process."""
    from bench.environment import peak_memory_mb

    trainer = make_trainer(perf_spec(method, args))
    trainer.train(args.steps)
    return {"method": method, "peak_mem_mb": peak_memory_mb(trainer.device)}


def peak_memory(methods: list[str], args) -> pd.DataFrame:
    rows = []
    for method in methods:
        command = [sys.executable, "-m", "bench.perf", "--memory-child", method, "--steps", str(args.steps),
                   "--batch-size", str(args.batch_size), "--device", args.device, "--threads", str(args.threads)]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    frame = pd.DataFrame(rows)
    reference = reference_method()
    if reference in methods:
        frame[f"vs_{reference}"] = frame["peak_mem_mb"] / frame.loc[frame["method"] == reference, "peak_mem_mb"].iloc[0]
    return frame


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.perf", description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="all", help="comma-separated, or all (default)")
    p.add_argument("--steps", type=int, default=8, help="steps per variant per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--memory", action="store_true", help="also measure peak memory, one process per method")
    p.add_argument("--no-phases", dest="phases", action="store_false", help="skip the profiler phase split")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(peak_memory_child(args.memory_child, args)))
        return 0
    methods = list_methods() if args.methods == "all" else [m.strip() for m in args.methods.split(",")]
    methods = [m for m in methods if not m.startswith("test-")]
    if reference_method() not in methods:
        methods = [reference_method(), *methods]  # the reference every overhead is quoted against
    spec = perf_spec(methods[0], args)
    print(f"step time, median of {args.rounds} interleaved rounds x {args.steps} steps; batch {args.batch_size}, "
          f"{spec.model} width {spec.width}, K {spec.codebook_size}, D {spec.code_dim}, "
          f"device {args.device}, torch threads {torch.get_num_threads()}")
    frame = measure(methods, args)
    print(frame.to_markdown(index=False, floatfmt=".3f"))
    for method, split in frame.attrs["phases"].items():
        if split:
            print(f"\n{method} phases (ms per step, profiler): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in sorted(split.items())))
    if args.memory:
        print("\npeak memory, one process per method (CPU: peak RSS incl. torch itself; GPU: allocator peak)")
        print(peak_memory(methods, args).to_markdown(index=False, floatfmt=".3f"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
