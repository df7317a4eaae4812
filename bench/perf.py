"""`python -m bench.perf` : training-step cost of every method, measured side by side in one process.

For each method, interleaved round by round with every other method so that machine noise hits all alike:
  - `harness`: steps of the real training loop (bench.train.Trainer.train),
  - `bare`:    the same model stepped by a plain hand-written loop,
  - `no-vq`:   the same encoder and decoder with no quantizer at all.
It prints median step times and the ratios method/no-vq, method/reference (`ste`), harness/bare, the split of a method's
time into its profiler-labelled phases (record_function names such as "mq/outer"), and with --memory the peak
memory of each method measured in a separate process (on the CPU the peak RSS never shrinks).

With --ranks R (CPU, gloo): each method's training step on R data-parallel ranks of one thread each (spawned
processes, one process group) against one process with R threads, at the same global batch, interleaved round
by round; the ratio is the median of the per-round ratios (R ranks / one process).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import copy
import itertools
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


# --- --ranks: R data-parallel CPU ranks against one process with R threads ---------------------------------------

RANKS_METHODS = "ste,mq,ema"  # the default of --ranks: the reference, the bi-level method, one with synced state
STORE_TIMEOUT_S = 3600.0  # a rank waits this long for its next command (the parent measures meanwhile)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_worker(index: int, methods: list[str], options: dict, store_port: int, master_port: int) -> None:
    """One of R ranks (a process spawned by measure_ranks): joins the process group through the Trainer, as under
    torchrun, builds and warms every method's Trainer, then times the steps the parent asks for. Commands and
    results travel through the parent's torch.distributed TCPStore: `cmd/K` is "METHOD STEPS" or "stop",
    rank 0 answers `result/K` with seconds per step, timed between two barriers of the group."""
    import datetime

    import torch.distributed as dist

    os.environ.update(RANK=str(index), LOCAL_RANK=str(index), WORLD_SIZE=str(options["ranks"]),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port))
    args = argparse.Namespace(**options)
    torch.set_num_threads(args.threads)
    store = dist.TCPStore("127.0.0.1", store_port, is_master=False,
                          timeout=datetime.timedelta(seconds=STORE_TIMEOUT_S))
    trainers = {}
    try:
        for method in methods:
            torch.manual_seed(0)
            trainer = trainers[method] = make_trainer(perf_spec(method, args))
            trainer.train(args.warmup)
        store.set(f"ready/{index}", "1")
        for k in itertools.count():
            command = store.get(f"cmd/{k}").decode()
            if command == "stop":
                break
            method, steps = command.split()
            trainer = trainers[method]
            dist.barrier()
            start = time.perf_counter()
            trainer.train(trainer.step + int(steps))
            dist.barrier()
            if index == 0:
                store.set(f"result/{k}", repr((time.perf_counter() - start) / int(steps)))
    finally:
        for trainer in trainers.values():
            trainer.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def wait_key(store, key: str, context, poll_s: float = 0.05) -> bytes:
    """The store's value of `key` once a rank set it; raises at once when a rank process failed. (Polled: a
    blocking wait on the store could not notice a dead rank, and its timeouts print warnings.)"""
    while not store.check([key]):
        context.join(timeout=poll_s)  # sleeps; raises ProcessRaisedException / ProcessExitedException if a rank died
    return store.get(key)


def measure_ranks(methods: list[str], args) -> pd.DataFrame:
    """Every method's step on args.ranks ranks (one process group, `threads` threads each) and in this process with
    ranks x threads threads, at the same global batch. In each round every method runs both variants once, the
    order of the methods rotating from round to round and the order of the variants alternating, so slow spells of
    the machine hit both alike; step times are medians over rounds, the ratio the median of per-round ratios."""
    import datetime
    import importlib

    import torch.distributed as dist
    import torch.multiprocessing as mp

    from bench.distributed import check_batch

    check_batch(args.batch_size, args.ranks)
    rank_threads = args.threads or 1
    store_port, master_port = free_port(), free_port()
    store = dist.TCPStore("127.0.0.1", store_port, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=STORE_TIMEOUT_S))
    options = {**vars(args), "threads": rank_threads}
    worker = importlib.import_module("bench.perf").rank_worker  # by its module name, also under `python -m`
    context = mp.start_processes(worker, args=(methods, options, store_port, master_port), nprocs=args.ranks,
                                 join=False, start_method="spawn")
    trainers = {}
    try:
        single_args = argparse.Namespace(**{**vars(args), "threads": rank_threads * args.ranks})
        for method in methods:
            torch.manual_seed(0)
            trainer = trainers[method] = make_trainer(perf_spec(method, single_args))
            trainer.train(args.warmup)
        for rank in range(args.ranks):
            wait_key(store, f"ready/{rank}", context)
        commands = itertools.count()

        def on_ranks(method: str) -> float:
            k = next(commands)
            store.set(f"cmd/{k}", f"{method} {args.steps}")
            return float(wait_key(store, f"result/{k}", context))

        times = {method: {"one-process": [], "ranks": []} for method in methods}
        for round_index in range(args.rounds):
            shift = round_index % len(methods)
            for method in methods[shift:] + methods[:shift]:
                trainer = trainers[method]
                variants = {"one-process": lambda t=trainer: timed(lambda n: t.train(t.step + n), args.steps,
                                                                   t.device),
                            "ranks": lambda m=method: on_ranks(m)}
                order = list(variants) if round_index % 2 == 0 else list(variants)[::-1]
                for name in order:
                    times[method][name].append(variants[name]())
        store.set(f"cmd/{next(commands)}", "stop")
        while not context.join(timeout=60):
            pass
    finally:
        for trainer in trainers.values():
            trainer.close()
        for process in context.processes:  # after a failure: no rank left behind
            if process.is_alive():
                process.kill()
                process.join()
    return summarize_ranks(times, args.ranks)


def summarize_ranks(times: dict[str, dict[str, list[float]]], ranks: int) -> pd.DataFrame:
    """times[method]["one-process" | "ranks"] = seconds per step, one entry per round."""
    rows = []
    for method, t in times.items():
        rows.append({"method": method, "one_process_ms": 1000 * statistics.median(t["one-process"]),
                     f"ranks_{ranks}_ms": 1000 * statistics.median(t["ranks"]),
                     "ranks_vs_one_process": statistics.median(r / o for r, o in zip(t["ranks"], t["one-process"]))})
    return pd.DataFrame(rows)


def main_ranks(args) -> int:
    from bench import UserError

    text = args.methods or RANKS_METHODS
    methods = list_methods() if text == "all" else [m.strip() for m in text.split(",") if m.strip()]
    methods = [m for m in methods if not m.startswith("test-")]
    if args.device not in ("cpu", "auto") or (args.device == "auto" and torch.cuda.is_available()):
        print("error: --ranks measures CPU ranks (gloo); pass --device cpu", file=sys.stderr)
        return 2
    args.device = "cpu"
    threads = args.threads or 1
    try:
        print(f"step time, median of {args.rounds} interleaved rounds x {args.steps} steps; global batch "
              f"{args.batch_size}: {args.ranks} ranks (gloo) x {threads} thread(s) with {args.batch_size // args.ranks}"
              f" rows each, against one process with {threads * args.ranks} threads; ratio: median of per-round "
              f"ratios (goal: at most 1.15)")
        frame = measure_ranks(methods, args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(frame.to_markdown(index=False, floatfmt=".3f"))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.perf", description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=None, help=f"comma-separated, or all (default; with --ranks: {RANKS_METHODS})")
    p.add_argument("--steps", type=int, default=8, help="steps per variant per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (with --ranks: per rank, default 1)")
    p.add_argument("--ranks", type=int, default=0, metavar="R",
                   help="time R data-parallel CPU ranks (gloo) against one process with R threads, same global batch")
    p.add_argument("--memory", action="store_true", help="also measure peak memory, one process per method")
    p.add_argument("--no-phases", dest="phases", action="store_false", help="skip the profiler phase split")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.ranks:
        if args.ranks < 2 or args.memory or args.memory_child:
            p.error("--ranks takes 2 or more, and not with --memory")
        return main_ranks(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(peak_memory_child(args.memory_child, args)))
        return 0
    methods = list_methods() if args.methods in (None, "all") else [m.strip() for m in args.methods.split(",")]
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
