"""Tests of the tests: one-line changes to defining lines, each of which the fast tests must catch.

    python tests/mutants.py              # every mutant (a few minutes on 2 CPU cores)
    python tests/mutants.py -k mq ema    # only mutants whose name contains one of these words
    python tests/mutants.py --list       # the mutants, without running anything

The working tree (tracked and untracked, not ignored, files; the results set excluded) is copied to a temporary
directory. The test files the mutants name are first run there unmutated: they must pass. Then, one mutant at a
time, one exact string of one file is replaced (it must occur exactly once: a string that is gone means the code
moved and the mutant needs updating, reported as `stale`), `python -m pytest -q -x` runs the mutant's test files
in the copy with PYTHONPATH at the copy, and the file is restored. The table says caught or survived per mutant;
the exit status is non-zero if any survived or is stale. Not collected by pytest (no test_ prefix), not run in CI.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

METHODS = "tests/test_definitions_methods.py"
METRICS = "tests/test_definitions_metrics.py"
SCHEDULES = "tests/test_schedules.py"
STREAMS_RECORDS = "tests/test_definitions_streams_records.py"
NEW_METHODS = "tests/test_new_methods.py"


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the project root
    old: str  # an exact string occurring once in the file
    new: str
    tests: tuple[str, ...]  # pytest arguments: files, optionally "-k", "expr"


MUTANTS = [
    # --- the four of issue 13 -----------------------------------------------------------------------------------
    Mutant("mq-meta-term-sign", "methods/mq.py",
           "return [d + t for d, t in zip(direct, term)]", "return [d - t for d, t in zip(direct, term)]",
           (METHODS, "-k", "mq")),
    Mutant("ste-weights-swapped", "methods/ste.py",
           "aux = codebook_weight * codebook_loss + commitment_weight * commitment_loss",
           "aux = commitment_weight * codebook_loss + codebook_weight * commitment_loss",
           (METHODS, "-k", "ste")),
    Mutant("mse-summed-per-image", "bench/metrics.py",
           "per_image = (fake - real).pow(2).flatten(1).mean(1).double()",
           "per_image = (fake - real).pow(2).flatten(1).sum(1).double()", (METRICS,)),
    Mutant("psnr-20-log10", "bench/metrics.py",
           "psnr_sum += (10.0 * torch.log10(", "psnr_sum += (20.0 * torch.log10(", (METRICS,)),
    Mutant("ema-flags-rotation-trick", "methods/ema.py",
           "    rotation_trick=False,\n", "    rotation_trick=True,\n", (METHODS, "-k", "ema or library")),
    # --- methods ----------------------------------------------------------------------------------------------------
    Mutant("fc-search-not-normalized", "methods/fc.py", "x = F.normalize(work, dim=1)  # (N, d)",
           "x = work  # (N, d)", (NEW_METHODS, "-k", "fc")),
    Mutant("fc-weights-swapped", "methods/fc.py",
           "aux = self.codebook_weight * codebook_loss + self.commitment_weight * commitment_loss",
           "aux = self.commitment_weight * codebook_loss + self.codebook_weight * commitment_loss",
           (NEW_METHODS, "-k", "fc")),
    Mutant("ibq-plain-straight-through", "methods/ibq.py",
           "straight_through = chosen + (soft - soft.detach()) @ codebook  # (N, D)",
           "straight_through = rows + (chosen - rows).detach()  # (N, D)", (NEW_METHODS, "-k", "ibq")),
    Mutant("ibq-batch-entropy-sign", "methods/ibq.py", "- self.batch_entropy_weight * batch_entropy)",
           "+ self.batch_entropy_weight * batch_entropy)", (NEW_METHODS, "-k", "ibq")),
    Mutant("bsq-commitment-per-channel", "methods/bsq.py", "commitment_weight * self.bits, diversity_gamma",
           "commitment_weight, diversity_gamma", (NEW_METHODS, "-k", "bsq")),
    Mutant("rvq-shared-codebook", "methods/rvq.py", "shared_codebook=False,", "shared_codebook=True,",
           (NEW_METHODS, "-k", "rvq")),
    Mutant("ema-library-default-decay", "methods/ema.py", "    decay=0.99,\n", "    decay=0.8,\n",
           (METHODS, "-k", "ema or library")),
    Mutant("ema-commitment-default", "methods/ema.py",
           "class EMAVQ(LibraryVQ):\n    def __init__(self, dim: int, codebook_size: int, decay: float = 0.99, "
           "commitment_weight: float = 0.25):",
           "class EMAVQ(LibraryVQ):\n    def __init__(self, dim: int, codebook_size: int, decay: float = 0.99, "
           "commitment_weight: float = 1.0):", (METHODS, "-k", "ema or library")),
    Mutant("cosine-without-normalization", "methods/cosine.py", '"use_cosine_sim": True', '"use_cosine_sim": False',
           (METHODS, "-k", "ema or library")),
    Mutant("rotation-weights-swapped", "methods/rotation.py",
           "self.codebook_weight * codebook_loss + self.commitment_weight * commitment_loss",
           "self.commitment_weight * codebook_loss + self.codebook_weight * commitment_loss",
           (METHODS, "-k", "rotation")),
    Mutant("fsq-symmetry-preserving-rounding", "methods/fsq.py", "            preserve_symmetry=False,",
           "            preserve_symmetry=True,", (METHODS, "-k", "fsq")),
    Mutant("fsq-bound-without-shift", "methods/fsq.py", "shift = torch.atanh(offset / half_l)",
           "shift = torch.zeros_like(offset)", (METHODS, "-k", "fsq")),
    Mutant("lfq-diversity-gamma-ignored", "methods/lfq.py", "diversity_gamma=diversity_gamma,",
           "diversity_gamma=1.0,", (METHODS, "-k", "lfq")),
    Mutant("simvq-commitment-weight-unscaled", "methods/simvq.py",
           "input_to_quantize_commit_loss_weight=commitment_weight / codebook_weight,",
           "input_to_quantize_commit_loss_weight=commitment_weight,", (METHODS, "-k", "simvq")),
    Mutant("simvq-rotation-trick", "methods/simvq.py", "rotation_trick: bool = False,", "rotation_trick: bool = True,",
           (METHODS, "-k", "simvq")),
    Mutant("cvq-soft-rule-without-k", "methods/cvq.py",
           "alpha = torch.exp(-10.0 * k * self.usage", "alpha = torch.exp(-10.0 * self.usage", (METHODS, "-k", "cvq")),
    Mutant("cvq-farthest-anchor", "methods/cvq.py", "return rows[distances.argmin(0)]",
           "return rows[distances.argmax(0)]", (METHODS, "-k", "cvq")),
    Mutant("cvq-hard-rule-uncorrected", "methods/cvq.py",
           "alpha = (k * self.usage / self.usage_weight < self.dead_threshold).float()",
           "alpha = (k * self.usage < self.dead_threshold).float()", (METHODS, "-k", "cvq")),
    Mutant("affine-scale-without-multiplier", "methods/affine.py",
           "return 1.0 + self.lr_multiplier * self.scale_raw", "return 1.0 + self.scale_raw",
           (METHODS, "-k", "affine")),
    Mutant("affine-sync-unweighted", "methods/affine.py",
           "quantized = quantized + self.sync_nu * (chosen - chosen.detach())",
           "quantized = quantized + (chosen - chosen.detach())", (METHODS, "-k", "affine")),
    Mutant("gumbel-kl-sign", "methods/gumbel.py", "(log_q + math.log(self.codebook_size))",
           "(log_q - math.log(self.codebook_size))", (METHODS, "-k", "gumbel")),
    Mutant("mq-weights-swapped", "methods/mq.py",
           "z, self.codebook(), self.rate * self.codebook_weight, self.rate * self.commitment_weight",
           "z, self.codebook(), self.rate * self.commitment_weight, self.rate * self.codebook_weight",
           (METHODS, "-k", "mq")),
    Mutant("mq-accumulated-sum-not-mean", "methods/mq.py", "p.grad = g.div_(self.accum_count)", "p.grad = g",
           (METHODS, "-k", "mq")),
    Mutant("mq-outer-step-off-by-one", "methods/mq.py", "if (ctx.step + 1) % self.outer_every == 0:",
           "if ctx.step % self.outer_every == 0:", (METHODS, "-k", "mq")),
    # --- metrics ----------------------------------------------------------------------------------------------------
    Mutant("perplexity-in-bits", "bench/metrics.py", "entropy = -(p[p > 0] * p[p > 0].log()).sum()",
           "entropy = -(p[p > 0] * p[p > 0].log2()).sum()", (METRICS,)),
    Mutant("usage-counts-singletons-as-dead", "bench/metrics.py", "used = int((counts > 0).sum())",
           "used = int((counts > 1).sum())", (METRICS,)),
    Mutant("quant-error-unweighted-batches", "bench/metrics.py",
           "quant_error += out.quant_error.double() * len(batch)", "quant_error += out.quant_error.double()",
           (METRICS,)),
    Mutant("ssim-of-the-real-images", "bench/metrics.py", "ssim_metric.update(fake, real)",
           "ssim_metric.update(real, real)", (METRICS,)),
    Mutant("kid-seed", "bench/fid.py", "KID_SEED = 2020", "KID_SEED = 2021", (METRICS, "-k", "kid")),
    Mutant("kid-subsets", "bench/fid.py", "KID_SUBSETS = 100", "KID_SUBSETS = 10", (METRICS, "-k", "kid")),
    # --- schedules --------------------------------------------------------------------------------------------------
    Mutant("warmup-first-step-zero", "methods/schedules.py",
           "return (step if warmup_from_zero else step + 1) / warmup", "return step / warmup",
           (SCHEDULES, "-k", "warmup")),
    Mutant("cosine-quarter-period", "methods/schedules.py", "math.cos(math.pi * progress)",
           "math.cos(math.pi * progress / 2)", (SCHEDULES, "-k", "warmup")),
    Mutant("harness-lr-one-step-late", "bench/train.py",
           'group["lr"] = spec.lr * warmup_cosine(self.step, spec.warmup_steps, spec.steps)',
           'group["lr"] = spec.lr * warmup_cosine(self.step + 1, spec.warmup_steps, spec.steps)',
           (SCHEDULES, "-k", "harness")),
    Mutant("prior-lr-without-floor", "bench/prior.py",
           "warmup_cosine(step, config.warmup_steps, config.steps, floor=0.1)",
           "warmup_cosine(step, config.warmup_steps, config.steps)", (SCHEDULES, "-k", "prior")),
    Mutant("mq-outer-rate-warmup-from-one", "methods/mq.py",
           "warmup_cosine(step, warmup, self.total_steps, warmup_from_zero=True)",
           "warmup_cosine(step, warmup, self.total_steps)", (SCHEDULES, "-k", "mq")),
    Mutant("gumbel-cosine-temperature-inverted", "methods/gumbel.py",
           "return tau_end + 0.5 * (tau_start - tau_end) * (1.0 + math.cos(math.pi * progress))",
           "return tau_end + 0.5 * (tau_start - tau_end) * (1.0 - math.cos(math.pi * progress))",
           (SCHEDULES, "-k", "gumbel")),
    Mutant("discriminator-starts-a-step-late", "bench/models/vqgan.py",
           "self.disc_start_step = round(self.disc_start * total_steps)",
           "self.disc_start_step = round(self.disc_start * total_steps) + 1", (SCHEDULES, "-k", "discriminator")),
    Mutant("discriminator-ramp-from-run-start", "bench/models/vqgan.py",
           "factor = warmup_cosine(self.step - self.disc_start_step, self.disc_warmup_steps,",
           "factor = warmup_cosine(self.step, self.disc_warmup_steps,", (SCHEDULES, "-k", "discriminator")),
    # --- the record -------------------------------------------------------------------------------------------------
    Mutant("record-allows-nan", "bench/records.py", "allow_nan=False", "allow_nan=True", (STREAMS_RECORDS,)),
    Mutant("record-list-columns", "bench/records.py", "if not isinstance(v, (dict, list))",
           "if not isinstance(v, dict)", (STREAMS_RECORDS,)),
    Mutant("record-any-key-suffices", "bench/records.py", "all(k in record for k in RECORD_KEYS)",
           "any(k in record for k in RECORD_KEYS)", (STREAMS_RECORDS,)),
    Mutant("record-temporary-left-behind", "bench/records.py", "        Path(tmp).unlink(missing_ok=True)\n",
           "        pass\n", (STREAMS_RECORDS,)),
    # --- the batch streams (last: IndexStream has moved before; see where it lives) ----------------------------------
    Mutant("stream-same-order-every-epoch", "bench/datasets/streams.py", "+ self.stream * 7_919 + epoch)",
           "+ self.stream * 7_919)", (STREAMS_RECORDS, "-k", "stream or epoch or batch")),
    Mutant("stream-keeps-the-incomplete-batch", "bench/datasets/streams.py",
           "self.per_epoch = size // batch_size", "self.per_epoch = -(-size // batch_size)",
           (STREAMS_RECORDS, "-k", "stream or epoch or batch")),
    Mutant("stream-overlapping-slices", "bench/datasets/streams.py",
           "return self._order[slot * self.batch_size:(slot + 1) * self.batch_size]",
           "return self._order[slot:slot + self.batch_size]", (STREAMS_RECORDS, "-k", "stream or epoch or batch")),
]


def copy_project(destination: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if name.startswith("results/") or not source.is_file():  # deleted in the tree but still listed, or a link
            continue
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def pytest(copy: Path, arguments: tuple[str, ...], timeout: float, extra: str = "") -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *arguments,
               *shlex.split(extra)]
    try:
        done = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "timed out"
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    return done.returncode, lines[-1] if lines else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", nargs="+", default=[], help="run only mutants whose name contains one of these")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per pytest run")
    parser.add_argument("--pytest-args", default="", help="appended to every pytest run, e.g. '--deselect ID'")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.k or any(word in m.name for word in args.k)]
    if args.list:
        for m in chosen:
            print(f"{m.name:38s} {m.path}: {m.old.strip()!r} -> {m.new.strip()!r}")
        return 0

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vq-bench-mutants-") as tmp:
        copy = Path(tmp)
        copy_project(copy)
        where = subprocess.run([sys.executable, "-c", "import methods, bench; print(methods.__file__, bench.__file__)"],
                               cwd=copy, env={**os.environ, "PYTHONPATH": str(copy)}, capture_output=True, text=True)
        if not all(p.startswith(str(copy)) for p in where.stdout.split()) or where.returncode:
            print(f"the copy's packages are not the ones imported: {where.stdout}{where.stderr}")
            return 2
        files = tuple(sorted({a for m in chosen for a in m.tests if a.endswith(".py")}))
        code, summary = pytest(copy, files, args.timeout, args.pytest_args)
        print(f"unmutated: {' '.join(files)}: {summary}")
        if code != 0:
            print("the tests fail without any mutant: fix that first")
            return 2

        rows = []
        for m in chosen:
            path = copy / m.path
            original = path.read_text() if path.exists() else ""
            count = original.count(m.old)
            if count != 1:
                rows.append((m, "stale", f"{m.path}: the string occurs {count} times (the code moved?)", 0.0))
                continue
            t = time.perf_counter()
            path.write_text(original.replace(m.old, m.new))
            try:
                code, summary = pytest(copy, m.tests, args.timeout, args.pytest_args)
            finally:
                path.write_text(original)
            verdict = "survived" if code == 0 else ("caught" if code == 1 else f"error (exit {code})")
            rows.append((m, verdict, summary, time.perf_counter() - t))
            print(f"{m.name:38s} {verdict:9s} {time.perf_counter() - t:5.1f}s  {summary}", flush=True)

    print()
    print(f"| mutant | file | change | tests | result |")
    print(f"|---|---|---|---|---|")
    for m, verdict, summary, _ in rows:
        change = f"`{m.old.strip()}` -> `{m.new.strip()}`".replace("|", "\\|").replace("\n", " ")
        print(f"| {m.name} | {m.path} | {change} | {' '.join(m.tests)} | {verdict} |")
    bad = [m.name for m, verdict, _, _ in rows if verdict != "caught"]
    caught = len(rows) - len(bad)
    print(f"\n{caught} of {len(rows)} mutants caught in {time.perf_counter() - start:.0f} s")
    if bad:
        print("not caught: " + ", ".join(bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
