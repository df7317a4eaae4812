"""`python -m bench.run --methods mq,ema --dataset cifar10 --seeds 0,1,2` : train and record a grid of runs.

Values come from RunSpec's defaults, then a preset (--preset), then the flags. Each (method, seed) pair is
one RunSpec and one record; a record that exists is skipped, a run with a checkpoint resumes.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import secrets
import sys
from pathlib import Path

from bench import UserError, distributed
from bench.datasets import check_readable, list_datasets, load_dataset
from bench.inception import find_inception_weights
from bench.launch import LAUNCHERS, ClusterOptions
from bench.models import MODELS
from bench.options import add_flags, check_keys, coerce, describe_type, field_types, flag_values, parse_text
from bench.records import check_experiment_name, read_record_files, records_frame
from bench.spec import RunSpec, list_presets, load_preset, preset_values
from bench.tracking import check_trackers
from bench.train import RunInterrupted
from methods import (MethodError, check_option_names, list_methods, method_entry, method_option_types,
                     method_options)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--methods", help="comma-separated method names (see --list)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--preset", help="a bundled preset name or a .toml path (see --list)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any setting (warmup_steps=10), a model or prior option (model_options.ch=64, "
                        "prior_options.steps=100) or a method option (mq.outer_every=2); repeatable")
    p.add_argument("--out", default="results", help="results directory for records (default results/)")
    p.add_argument("--scratch", default="runs", help="working files: checkpoints (default runs/)")
    p.add_argument("--launcher", default="inline", help=f"one of {', '.join(LAUNCHERS)}")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each run's final checkpoint in --scratch (default: removed once its record is written)")
    p.add_argument("--list", action="store_true", help="print methods, datasets, models and presets, then exit")
    p.add_argument("--describe", metavar="NAME", help="print one method's, model's or preset's settings, then exit")
    add_flags(p.add_argument_group("run settings (bench/spec.py:RunSpec; also --set KEY=VALUE)"), RunSpec)
    model_flags = p.add_argument_group("model options (bench/models; also --set model_options.KEY=VALUE)")
    for options in unique(entry.options for entry in MODELS.values()):
        add_flags(model_flags, options, dest_prefix="model_options.", named_only=True)
    slurm = p.add_argument_group("SLURM (--launcher slurm; also local where it applies; bench/launch.py:ClusterOptions)")
    slurm.add_argument("--slurm-preset", help="a cluster preset in slurm/ (e.g. local) or a .toml path")
    add_flags(slurm, ClusterOptions, dest_prefix="cluster.")
    slurm.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE", help="extra #SBATCH option")
    slurm.add_argument("--no-wait", action="store_true", help="submit, print the job ids and return")
    slurm.add_argument("--count", action="store_true",
                       help="print the number of runs in the grid, then exit (for sbatch --array=0-<count-1>)")
    slurm.add_argument("--array-index", type=int, metavar="I",
                       help="run only the I-th run of the grid (0-based; methods in order, seeds within each "
                            "method), as one element of your own sbatch array: see slurm/sbatch-example.sh")
    return p


def unique(items):
    return list(dict.fromkeys(items))


def split_list(flag: str, text: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise UserError(f"{flag} names nothing ({text!r}); give a comma-separated list")
    return items


def nested_types(values: dict, table: str) -> dict:
    """The declared types of a nested table's keys: the chosen model's options, or the prior's."""
    from bench.models import model_entry
    from bench.prior import PriorConfig

    if table == "prior_options":
        return field_types(PriorConfig)
    return field_types(model_entry(RunSpec(method="", model=values.get("model", "vqvae"))).options)


def typed_method_options(method: str, options: dict) -> dict:
    """A method's options, each checked against its factory's annotation (unknown names refused)."""
    types_ = method_option_types(method)
    check_option_names(method, options)
    return {k: coerce(types_[k], v, f"{method}.{k}") for k, v in options.items()}


def build_specs(args: argparse.Namespace) -> list[RunSpec]:
    """The grid: RunSpec defaults, then the preset, then --set, then the flags (a flag wins over --set)."""
    values: dict = load_preset(args.preset) if args.preset else {}
    preset_methods = values.pop("methods", None)
    method_opts: dict[str, dict] = values.pop("method_options", {}) or {}
    methods_text = args.methods or (",".join(preset_methods) if preset_methods else None)
    if not methods_text:
        raise UserError("no methods given; pass --methods ste,ema (see --list for the names)")
    methods = unique(split_list("--methods", methods_text))
    for method in methods:
        method_options(method)  # raises MethodError listing valid names
    for method in method_opts:
        try:
            method_options(method)
        except MethodError as error:
            raise UserError(f"preset {args.preset}: [method_options.{method}]: {error}") from None
    method_opts = {m: typed_method_options(m, o) for m, o in method_opts.items()}

    spec_types = field_types(RunSpec)
    flags = flag_values(args, RunSpec)
    for item in args.set:
        key, sep, text = item.partition("=")
        if not sep:
            raise UserError(f"--set takes KEY=VALUE, got {item!r}")
        head, dot, option = key.partition(".")
        if not dot:
            check_keys([key], spec_types, "setting")
            values[key] = parse_text(spec_types[key], text, f"--set {key}")
        elif head in ("model_options", "prior_options"):
            types_ = nested_types({**values, **flags}, head)
            check_keys([option], types_, f"{head} key")
            values[head] = {**values.get(head, {}), option: parse_text(types_[option], text, f"--set {key}")}
        elif head not in methods:
            raise UserError(f"--set {key}: {head!r} is not a method of this grid ({', '.join(methods)}); "
                            f"set an option of one of them, or add {head} to --methods")
        else:
            check_option_names(head, [option])
            method_opts.setdefault(head, {})[option] = parse_text(method_option_types(head)[option], text, f"--set {key}")
    values.update(flags)
    for options in unique(entry.options for entry in MODELS.values()):
        given = flag_values(args, options, dest_prefix="model_options.")
        values["model_options"] = {**values.get("model_options", {}), **given}
    head, _, folder = str(values.get("dataset", "photos")).partition(":")  # imagefolder:PATH -> its last part
    dataset_label = f"{head}-{Path(folder).name}" if folder else head  # the experiment names a directory: no "/"
    values.setdefault("experiment", f"{dataset_label}-{values.get('model', 'vqvae')}")
    check_experiment_name(str(values["experiment"]))

    seeds = unique(parse_text(int, s, "--seeds") for s in split_list("--seeds", args.seeds))
    specs = []
    for method in methods:
        for seed in seeds:
            spec = RunSpec.from_dict({**values, "method": method, "seed": seed,
                                      "method_options": dict(method_opts.get(method, {}))})
            spec.validate()
            specs.append(spec)
    return specs


def check_buildable(specs: list[RunSpec]) -> None:
    """Fail before any run starts: the model, every method's options and the data must be usable, and every
    image file of a streamed dataset readable."""
    from bench.models import build_model

    for spec in {(s.method, s.model, s.codebook_size, s.code_dim, repr(s.method_options), repr(s.model_options)): s
                 for s in specs}.values():
        build_model(spec)
    for spec in {(s.dataset, s.data_root): s for s in specs}.values():
        check_readable(load_dataset(spec.dataset, spec.data_root, spec.download))
    for path in {s.inception_weights for s in specs if s.fid and s.inception_weights}:
        find_inception_weights(path)  # a path that is not a file: one clear error now, not after training
    check_trackers({name for s in specs for name in s.log})  # a missing tensorboard or wandb: now, one line


@contextlib.contextmanager
def writable_folders(folders: dict[str, Path]):
    """Create each folder (flag -> folder) and a probe file in it, then remove the probe: an unwritable --out or
    --scratch (a file, a read-only mount) is found now, not after training. If this or the block fails, the
    folders made here are removed again (when still empty)."""
    created: list[Path] = []
    try:
        for flag, folder in folders.items():
            missing = [p for p in [folder, *folder.parents] if not p.exists() and not p.is_symlink()]
            try:
                folder.mkdir(parents=True, exist_ok=True)
                created += reversed(missing)
                probe = folder / f".vqbench-probe-{os.getpid()}-{secrets.token_hex(4)}"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as error:
                why = "a file is in the way" if isinstance(error, (FileExistsError, NotADirectoryError)) else \
                    error.strerror or str(error)
                raise UserError(f"{flag} {folder} is not a writable folder ({why}); pass a folder you can write "
                                f"to") from None
        yield
    except BaseException:
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                pass
        raise


def warn_about(specs: list[RunSpec]) -> None:
    """Settings that are legal but probably not meant: one line each on stderr."""
    for warmup, steps in unique((s.warmup_steps, s.steps) for s in specs):
        if warmup >= steps:
            print(f"warning: --warmup-steps {warmup} is not below --steps {steps}: the learning rate rises for the "
                  f"whole run and never reaches --lr; pass a smaller --warmup-steps", file=sys.stderr)


def pick_array_element(specs: list[RunSpec], index: int, launcher: str) -> RunSpec:
    """The index-th RunSpec of the grid, for one element of a user's own sbatch array."""
    if launcher != "inline":
        raise UserError("--array-index runs one run in this process: use it with --launcher inline (the default)")
    if not 0 <= index < len(specs):
        raise UserError(f"--array-index {index} is outside the grid of {len(specs)} run(s) (0..{len(specs) - 1}); "
                        f"`--count` prints the size for sbatch --array")
    return specs[index]


def cluster_flags(args: argparse.Namespace) -> dict:
    flags = flag_values(args, ClusterOptions, dest_prefix="cluster.")
    extra = {}
    for item in args.sbatch:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--sbatch takes KEY=VALUE (e.g. --sbatch exclude=node3), got {item!r}")
        extra[key.lstrip("-")] = value
    if extra:
        flags["sbatch"] = extra
    return flags


def print_list() -> None:
    """Every method with its options, every dataset, model (with its options), preset (with its description)."""
    def options_text(values: dict) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in values.items()) or "(no options)"

    print("methods (--methods; options: --set METHOD.OPTION=VALUE):")
    for name in list_methods():
        print(f"  {name:10} {options_text(method_options(name))}")
    print("datasets (--dataset):", ", ".join(list_datasets()))
    print("models (--model; options: --set model_options.OPTION=VALUE):")
    for name, entry in sorted(MODELS.items()):
        print(f"  {name:10} {options_text({f.name: f.default for f in dataclasses.fields(entry.options)})}")
    print("presets (--preset; --describe NAME for the settings):")
    for name in list_presets():
        print(f"  {name:18} {preset_values(name).get('description', '').split('. ')[0]}")
    print("launchers (--launcher):", ", ".join(LAUNCHERS))


def describe(name: str) -> None:
    """One method's options with their types, one model's options, or a preset's description and resolved runs."""
    if name in list_methods():
        factory = method_entry(name).factory
        summary = " ".join((factory.__doc__ or "").strip().split("\n\n")[0].split())
        print(f"method {name} ({factory.__module__}): {summary}")
        for option, default in method_options(name).items():
            print(f"  {option} = {default!r}  ({describe_type(method_option_types(name)[option])})")
    elif name in MODELS:
        print(f"model {name} (--set model_options.OPTION=VALUE)")
        types_ = field_types(MODELS[name].options)
        for f in dataclasses.fields(MODELS[name].options):
            print(f"  {f.name} = {f.default!r}  ({describe_type(types_[f.name])}) {f.metadata.get('help', '')}")
    else:
        if name not in list_presets() and not name.endswith(".toml"):
            raise UserError(f"--describe {name}: not a method, model or preset; `--list` names them all")
        values = preset_values(name)
        print(f"preset {name}: {values.get('description', '')}\n")
        for spec in build_specs(parser().parse_args(["--preset", name])):
            print(json.dumps({"run_id": spec.run_id(), "spec": spec.to_dict()}, indent=1))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.list:
        print_list()
        return 0
    try:
        if args.describe:
            describe(args.describe)
            return 0
        if args.launcher not in LAUNCHERS:
            raise UserError(f"unknown launcher {args.launcher!r}; valid launchers: {', '.join(LAUNCHERS)}")
        specs = build_specs(args)
        if args.count:
            print(len(specs))
            return 0
        if args.array_index is not None:
            specs = [pick_array_element(specs, args.array_index, args.launcher)]
        world = distributed.environment_world_size()
        if world > 1:  # under torchrun: refused before anything starts
            if args.launcher != "inline":
                raise UserError(f"this process is one of {world} ranks (torchrun): it trains inline; drop --launcher "
                                f"{args.launcher}")
            for spec in specs:
                distributed.check_batch(spec.batch_size, world)
            distributed.collective_timeout()
        main_rank = distributed.environment_rank() == 0
        out, scratch = Path(args.out), Path(args.scratch)
        if main_rank:  # under torchrun every rank parses the same grid: one warning is enough
            warn_about(specs)
        with writable_folders({"--out": out, "--scratch": scratch}):
            check_buildable(specs)
        options = {**vars(args), "cluster_flags": cluster_flags(args)}
        paths = LAUNCHERS[args.launcher](specs, out, scratch, options)
        if paths and main_rank:
            from bench.report import records_table

            print(records_table(records_frame(read_record_files(paths))))
            print(f"\n{len(paths)} record(s) in {out}; `python -m bench.report {out}` for tables and figures")
        if len(paths) < len(specs) and not args.no_wait:
            return 1  # some runs failed; the summary above names them
    except (UserError, MethodError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:  # Ctrl-C: checkpoints and records are atomic, nothing half-written
        print(interrupt.message() if isinstance(interrupt, RunInterrupted)
              else "interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
