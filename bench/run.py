"""`python -m bench.run --methods mq,ema --dataset cifar10 --seeds 0,1,2` : train and record a grid of runs.

Values come from RunSpec's defaults, then a preset (--preset), then the flags. Each (method, seed) pair is
one RunSpec and one record; a record that exists is skipped, a run with a checkpoint resumes.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import sys
from pathlib import Path

from bench import UserError
from bench.datasets import list_datasets, load_dataset
from bench.inception import find_inception_weights
from bench.launch import LAUNCHERS
from bench.models import MODELS
from bench.spec import RunSpec, list_presets, load_preset
from methods import MethodError, list_methods, method_options


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--methods", help="comma-separated method names (see --list)")
    p.add_argument("--dataset", help="dataset name (default photos, offline)")
    p.add_argument("--data-root", help="folder holding the dataset (default $VQBENCH_DATA or ~/.cache/vq-bench/data)")
    p.add_argument("--download", action="store_true", default=None, help="fetch the dataset when online")
    p.add_argument("--model", help="model name (default vqvae)")
    p.add_argument("--perceptual-weight", help="weight of the VQGAN perceptual (LPIPS) term; 0: none, no VGG needed")
    p.add_argument("--codebook-size", help="K, the same for every method")
    p.add_argument("--code-dim", help="D, the code dimension")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--steps", help="training steps")
    p.add_argument("--batch-size")
    p.add_argument("--lr")
    p.add_argument("--eval-every", help="validation curve interval in steps (0: only at the end)")
    p.add_argument("--ckpt-every", help="checkpoint interval in steps (0: only at the end)")
    p.add_argument("--preset", help="a bundled preset name or a .toml path (see --list)")
    p.add_argument("--experiment", help="experiment name; records of different experiments never mix")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any RunSpec field (warmup_steps=10) or a method option (mq.outer_every=2); repeatable")
    p.add_argument("--out", default="results", help="results directory for records (default results/)")
    p.add_argument("--scratch", default="runs", help="working files: checkpoints (default runs/)")
    p.add_argument("--launcher", default="inline", help=f"one of {', '.join(LAUNCHERS)}")
    slurm = p.add_argument_group("SLURM (--launcher slurm; also local where it applies)")
    slurm.add_argument("--slurm-preset", help="a cluster preset in slurm/ (e.g. local) or a .toml path")
    slurm.add_argument("--partition")
    slurm.add_argument("--gpus-per-node", type=int)
    slurm.add_argument("--cpus-per-task", type=int)
    slurm.add_argument("--mem-gb", type=int, help="memory per job (default 4; each job imports torch)")
    slurm.add_argument("--time", type=int, dest="time_min", help="time limit in minutes")
    slurm.add_argument("--array-parallelism", type=int, help="at most this many array elements at once")
    slurm.add_argument("--account")
    slurm.add_argument("--qos")
    slurm.add_argument("--constraint")
    slurm.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE", help="extra #SBATCH option")
    slurm.add_argument("--no-wait", action="store_true", help="submit, print the job ids and return")
    slurm.add_argument("--count", action="store_true",
                       help="print the number of runs in the grid, then exit (for sbatch --array=0-<count-1>)")
    slurm.add_argument("--array-index", type=int, metavar="I",
                       help="run only the I-th run of the grid (0-based; methods in order, seeds within each "
                            "method), as one element of your own sbatch array: see slurm/sbatch-example.sh")
    p.add_argument("--device", help="auto (default: a GPU when there is one), cpu, cuda, cuda:1")
    p.add_argument("--amp", help="auto (bf16 on GPU), off, bf16, fp16")
    p.add_argument("--threads", help="torch CPU threads (0: torch's default)")
    p.add_argument("--gfid", action="store_true", default=None, help="train the stage-2 prior and record gFID")
    p.add_argument("--no-fid", dest="fid", action="store_false", default=None,
                   help="skip rFID/KID (recorded as null with the reason)")
    p.add_argument("--inception-weights", help="FID Inception weights file (default: found offline, see README)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--list", action="store_true", help="print methods, datasets, models and presets, then exit")
    return p


def parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word such as mlp-tanh


def parse_int(flag: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"{flag} must be an integer, got {text!r}") from None
    return value


def build_specs(args: argparse.Namespace) -> list[RunSpec]:
    values: dict = load_preset(args.preset) if args.preset else {}
    preset_methods = values.pop("methods", None)
    method_opts: dict[str, dict] = values.pop("method_options", {}) or {}
    methods_text = args.methods or (",".join(preset_methods) if preset_methods else None)
    if not methods_text:
        raise UserError("no methods given; pass --methods ste,ema (see --list for the names)")
    methods = [m.strip() for m in methods_text.split(",") if m.strip()]
    for method in methods:
        method_options(method)  # raises MethodError listing valid names

    int_flags = {"codebook_size": args.codebook_size, "code_dim": args.code_dim, "steps": args.steps,
                 "batch_size": args.batch_size, "eval_every": args.eval_every, "ckpt_every": args.ckpt_every,
                 "threads": args.threads}
    for name, text in int_flags.items():
        if text is not None:
            values[name] = parse_int("--" + name.replace("_", "-"), text)
    if args.lr is not None:
        try:
            values["lr"] = float(args.lr)
        except ValueError:
            raise UserError(f"--lr must be a number, got {args.lr!r}") from None
    for name in ("dataset", "data_root", "download", "model", "experiment", "device", "amp", "gfid", "fid",
                 "inception_weights"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)

    fields = {f.name for f in dataclasses.fields(RunSpec)}
    for item in args.set:
        key, sep, text = item.partition("=")
        if not sep:
            raise UserError(f"--set takes KEY=VALUE, got {item!r}")
        method, dot, option = key.partition(".")
        if dot:
            method_opts.setdefault(method, {})[option] = parse_value(text)
        elif key in fields:
            values[key] = parse_value(text)
        else:
            raise UserError(f"--set {key}: no such setting; settings: {', '.join(sorted(fields))}")
    if args.perceptual_weight is not None:  # after --set, so the flag wins over --set model_options=...
        try:
            weight = float(args.perceptual_weight)
        except ValueError:
            raise UserError(f"--perceptual-weight must be a number, got {args.perceptual_weight!r}") from None
        values["model_options"] = {**(values.get("model_options") or {}), "perceptual_weight": weight}
    head, _, folder = str(values.get("dataset", "photos")).partition(":")  # imagefolder:PATH -> its last part
    dataset_label = f"{head}-{Path(folder).name}" if folder else head  # the experiment names a directory: no "/"
    values.setdefault("experiment", f"{dataset_label}-{values.get('model', 'vqvae')}")

    seeds = [parse_int("--seeds", s) for s in args.seeds.split(",") if s.strip()]
    specs = []
    for method in methods:
        for seed in seeds:
            spec = RunSpec.from_dict({**values, "method": method, "seed": seed,
                                      "method_options": dict(method_opts.get(method, {}))})
            spec.validate()
            specs.append(spec)
    return specs


def check_buildable(specs: list[RunSpec]) -> None:
    """Fail before any run starts: the model, every method's options and the data must be usable."""
    from bench.models import build_model

    for spec in {(s.method, s.model, s.codebook_size, s.code_dim, repr(s.method_options), repr(s.model_options)): s
                 for s in specs}.values():
        build_model(spec)
    for spec in {(s.dataset, s.data_root): s for s in specs}.values():
        load_dataset(spec.dataset, spec.data_root, spec.download)
    for path in {s.inception_weights for s in specs if s.fid and s.inception_weights}:
        find_inception_weights(path)  # a path that is not a file: one clear error now, not after training


def pick_array_element(specs: list[RunSpec], index: int, launcher: str) -> RunSpec:
    """The index-th RunSpec of the grid, for one element of a user's own sbatch array."""
    if launcher != "inline":
        raise UserError("--array-index runs one run in this process: use it with --launcher inline (the default)")
    if not 0 <= index < len(specs):
        raise UserError(f"--array-index {index} is outside the grid of {len(specs)} run(s) (0..{len(specs) - 1}); "
                        f"`--count` prints the size for sbatch --array")
    return specs[index]


def cluster_flags(args: argparse.Namespace) -> dict:
    flags = {k: getattr(args, k) for k in ("partition", "gpus_per_node", "cpus_per_task", "mem_gb", "time_min",
                                           "array_parallelism", "account", "qos", "constraint")}
    extra = {}
    for item in args.sbatch:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--sbatch takes KEY=VALUE (e.g. --sbatch exclude=node3), got {item!r}")
        extra[key.lstrip("-")] = value
    flags["sbatch"] = extra or None
    return flags


def print_list() -> None:
    print("methods: ", ", ".join(list_methods()))
    print("datasets:", ", ".join(list_datasets()))
    print("models:  ", ", ".join(sorted(MODELS)))
    print("presets: ", ", ".join(list_presets()))
    print("launchers:", ", ".join(LAUNCHERS))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.list:
        print_list()
        return 0
    try:
        if args.launcher not in LAUNCHERS:
            raise UserError(f"unknown launcher {args.launcher!r}; valid launchers: {', '.join(LAUNCHERS)}")
        specs = build_specs(args)
        if args.count:
            print(len(specs))
            return 0
        if args.array_index is not None:
            specs = [pick_array_element(specs, args.array_index, args.launcher)]
        check_buildable(specs)
        out, scratch = Path(args.out), Path(args.scratch)
        options = {**vars(args), "cluster_flags": cluster_flags(args)}
        paths = LAUNCHERS[args.launcher](specs, out, scratch, options)
        if paths:
            from bench.report import records_table
            from bench.records import load_records

            frame = load_records(out)
            frame = frame[frame["path"].isin([str(p) for p in paths])]
            print(records_table(frame))
            print(f"\n{len(paths)} record(s) in {out}; `python -m bench.report {out}` for tables and figures")
        if len(paths) < len(specs) and not args.no_wait:
            return 1  # some runs failed; the summary above names them
    except (UserError, MethodError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
