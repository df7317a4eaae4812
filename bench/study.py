"""`python -m bench.study studies/scaling.toml` : run a study, a grid with a purpose, and write its report.

A study file (TOML) declares:

    description = "..."
    kind = "grid"                      # or "tune"
    figure = "scaling"                 # what its report draws: scaling, ablation or tuned
    methods = ["ste", "ema"]           # arms named after methods, at their defaults (or [[arms]], below)
    seeds = [0, 1]
    [settings]                         # RunSpec fields for every run (steps, batch_size, fid, model_options, ...)
    [axes]                             # RunSpec fields -> values; the grid is arms x the axes' product x seeds
    codebook_size = [256, 1024]
    [method_options.fsq]               # options of one method, in every arm of it
    [[arms]]                           # ablations: named arms, each a method with options
    name = "mq (identity)"
    method = "mq"
    options = { hyper_net = "identity" }
    reference = "mq"                   # the arm paired differences are taken against

A tuning study (kind = "tune") gives every method the same number of `trials`: trial 0 is the method's defaults,
the others are drawn without replacement by a seeded random search over the method's declared search space
(`@register(..., search_space=...)`) crossed with the autoencoder's learning rate (`lr_space`). Trials train at
`trial_seeds` and are evaluated on the validation split (eval_split = "val"); the winner of each method is the
trial with the lowest validation `select` metric (mse or rfid), a diverged or missing trial counting as the
worst. `selection.json` says which trial won and why. Then the winning settings train at `final_seeds` and are
evaluated on the test split (phase "final"), and so do the defaults (phase "default") for the tuned-versus-default
comparison. Selection reads trial records only, and their metrics are validation metrics: the test split is
never read before every method's winner is fixed.

Records go to `<out>/<name>/` (experiments `<name>-trials` for the trials, `<name>` for the rest; a default run
is the final run itself where the defaults won); runs skip
finished records and resume from checkpoints like any grid. `--dry-run` prints the grid and its cost estimated
from the records already there.
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench import UserError
from bench.records import write_atomic
from bench.spec import RunSpec, read_toml
from methods import MethodError, method_options, search_space

LR_SPACE = (1e-4, 2e-4, 4e-4, 8e-4)  # the autoencoder's learning rate, in every method's tuning space
SELECT_METRICS = ("mse", "rfid")
FIGURES = ("scaling", "ablation", "tuned")
KINDS = ("grid", "tune")
STUDY_KEYS = {"description", "kind", "figure", "methods", "arms", "seeds", "settings", "axes", "method_options",
              "reference", "trials", "trial_seeds", "final_seeds", "select", "lr_space", "final_settings",
              "defaults", "reuse"}


@dataclass(frozen=True)
class Arm:
    name: str
    method: str
    options: dict = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Cell:
    arm: str  # the arm's name: a method name ("ste"), or an ablation arm ("mq (identity)")
    method: str  # the registered method
    point: dict  # the grid axes' values of this cell, e.g. {"codebook_size": 256}; {} without axes
    seed: int
    phase: str  # "grid", "trial" (tuning), "final" (tuned settings, final seeds), "default" (defaults, final seeds)
    trial: int | None  # the tuning trial (0: the method's defaults); None outside tuning
    spec: RunSpec  # spec.run_id() names its record: <out>/<spec.experiment>/<run_id>.json


@dataclass
class Study:
    name: str
    path: Path
    description: str
    kind: str
    figure: str
    arms: list[Arm]
    seeds: list[int]
    settings: dict
    axes: dict
    reference_arm: str | None = None
    trials: int = 0
    trial_seeds: list[int] = field(default_factory=list)
    final_seeds: list[int] = field(default_factory=list)
    select_metric: str = "mse"
    lr_space: tuple = LR_SPACE
    final_settings: dict = field(default_factory=dict)
    defaults: bool = True  # tuning: also train the defaults on the final seeds (tuned versus default on test)
    reuse: list[Path] = field(default_factory=list)  # folders whose records of the same run ids count as done

    # --- the grid ---------------------------------------------------------------------------------------

    def spec(self, arm: Arm, point: dict, seed: int, experiment: str, extra: dict | None = None,
             options: dict | None = None) -> RunSpec:
        values = {**self.settings, **point, **(extra or {}), "method": arm.method, "seed": seed,
                  "experiment": experiment, "method_options": {**arm.options, **(options or {})}}
        spec = RunSpec.from_dict(values)
        spec.validate()
        return spec

    def points(self) -> list[dict]:
        keys = list(self.axes)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.axes[k] for k in keys))]

    def cells(self, selection: dict | None = None) -> list[Cell]:
        """Every run of the study. A tuning study's final and default runs need its selection (from
        `select`); without one, only its trials."""
        if self.kind == "grid":
            return [Cell(arm.name, arm.method, point, seed, "grid", None, self.spec(arm, point, seed, self.name))
                    for arm in self.arms for point in self.points() for seed in self.seeds]
        cells = [Cell(arm.name, arm.method, {}, seed, "trial", i,
                      self.spec(arm, {}, seed, f"{self.name}-trials", {**trial, "eval_split": "val"}, options))
                 for arm in self.arms for i, (trial, options) in enumerate(self.trial_settings(arm))
                 for seed in self.trial_seeds]
        if selection is None:
            return cells
        for arm in self.arms:
            trial, options = self.trial_settings(arm)[selection["methods"][arm.name]["winner"]]
            cells += [Cell(arm.name, arm.method, {}, seed, "final", None,
                           self.spec(arm, {}, seed, self.name, {**self.final_settings, **trial}, options))
                      for seed in self.final_seeds]
            if self.defaults:
                cells += [Cell(arm.name, arm.method, {}, seed, "default", None,  # the same run as "final" when
                               self.spec(arm, {}, seed, self.name, self.final_settings))  # the defaults won
                          for seed in self.final_seeds]
        return cells

    def trial_settings(self, arm: Arm) -> list[tuple[dict, dict]]:
        """The arm's trials as (RunSpec values, method options): trial 0 the defaults, then a seeded random
        draw without replacement from lr_space x the method's search space (the same draw on every machine)."""
        space = {"lr": tuple(self.lr_space), **{f"method.{k}": v for k, v in search_space(arm.method).items()}}
        candidates = [dict(zip(space, values)) for values in itertools.product(*space.values())]
        default = {"lr": RunSpec.from_dict({**self.settings, "method": arm.method}).lr,
                   **{f"method.{k}": arm.options.get(k, v) for k, v in method_options(arm.method).items()
                      if f"method.{k}" in space}}
        candidates = [c for c in candidates if not same(c, default)]
        rng = random.Random(f"{self.name}:{arm.name}")  # str seeds are hashed with SHA-512: stable across runs
        chosen = rng.sample(candidates, min(self.trials - 1, len(candidates)))
        return [split_trial(t) for t in [{}, *chosen]]

    # --- tuning: the selection ----------------------------------------------------------------------------

    def select(self, out: Path) -> dict:
        """Each method's winning trial from the trial records alone (validation metrics): the lowest mean over
        trial seeds of the `select` metric; a diverged, missing or null trial ranks last. Never reads a record
        evaluated on the test split (it refuses one)."""
        methods = {}
        for arm in self.arms:
            trials = []
            for i, (settings, options) in enumerate(self.trial_settings(arm)):
                values, statuses, run_ids = [], [], []
                for seed in self.trial_seeds:
                    spec = self.spec(arm, {}, seed, f"{self.name}-trials", {**settings, "eval_split": "val"}, options)
                    path = out / spec.experiment / f"{spec.run_id()}.json"
                    run_ids.append(spec.run_id())
                    if not path.is_file():
                        statuses.append("missing")
                        continue
                    record = json.loads(path.read_text())
                    if record["spec"].get("eval_split") != "val":
                        raise UserError(f"{path}: a tuning trial evaluated on the {record['spec'].get('eval_split')} "
                                        f"split; selection reads validation metrics only: delete it and rerun")
                    statuses.append(record.get("status", "complete"))
                    values.append(record["metrics"].get(self.select_metric))
                usable = [v for v in values if v is not None]
                value = statistics.fmean(usable) if usable and len(usable) == len(self.trial_seeds) else None
                status = "complete" if value is not None else next(
                    (s for s in statuses if s != "complete"), "null metric")
                trials.append({"trial": i, "settings": {**settings, **{f"method.{k}": v for k, v in options.items()}},
                               "run_ids": run_ids, "status": status, "value": value})
            ranked = sorted(trials, key=lambda t: (t["value"] is None, t["value"] or 0.0, t["trial"]))
            methods[arm.name] = {"winner": ranked[0]["trial"], "trials": trials}
        return {"metric": self.select_metric, "split": "val", "seeds": self.trial_seeds,
                "rule": f"lowest validation {self.select_metric} (mean over trial seeds {self.trial_seeds}); a "
                        f"diverged, missing or null trial ranks last; ties go to the lower trial number (0: defaults)",
                "methods": methods}


def same(a: dict, b: dict) -> bool:
    return json.dumps(a, sort_keys=True, default=list) == json.dumps(b, sort_keys=True, default=list)


def split_trial(trial: dict) -> tuple[dict, dict]:
    """{"lr": .., "method.beta": ..} -> (RunSpec values, method options)."""
    return ({k: v for k, v in trial.items() if not k.startswith("method.")},
            {k.removeprefix("method."): v for k, v in trial.items() if k.startswith("method.")})


# --- reading a study file -------------------------------------------------------------------------------------

def load_study(path: str | Path) -> Study:
    path = Path(path)
    if not path.is_file():
        found = sorted(p.name for p in Path("studies").glob("*.toml")) if Path("studies").is_dir() else []
        raise UserError(f"study file {path} not found" + (f"; studies/ holds {', '.join(found)}" if found else ""))
    values = read_toml(path, str(path))
    where = f"study {path}"
    unknown = sorted(set(values) - STUDY_KEYS)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(STUDY_KEYS))}")
    kind = values.get("kind", "grid")
    figure = values.get("figure", "scaling" if values.get("axes") else "ablation")
    if kind not in KINDS:
        raise UserError(f"{where}: kind = {kind!r}; valid kinds: {', '.join(KINDS)}")
    if figure not in FIGURES:
        raise UserError(f"{where}: figure = {figure!r}; valid figures: {', '.join(FIGURES)}")
    arms = read_arms(values, where)
    select = values.get("select", "mse")
    if select not in SELECT_METRICS:
        raise UserError(f"{where}: select = {select!r}; valid: {', '.join(SELECT_METRICS)} (validation metrics)")
    study = Study(name=path.stem, path=path, description=values.get("description", ""), kind=kind, figure=figure,
                  arms=arms, seeds=ints(values.get("seeds", [0]), f"{where}: seeds"),
                  settings=dict(values.get("settings", {})), axes=dict(values.get("axes", {})),
                  reference_arm=values.get("reference"), trials=int(values.get("trials", 0)),
                  trial_seeds=ints(values.get("trial_seeds", [100]), f"{where}: trial_seeds"),
                  final_seeds=ints(values.get("final_seeds", [0, 1, 2]), f"{where}: final_seeds"),
                  select_metric=select, lr_space=tuple(values.get("lr_space", LR_SPACE)),
                  final_settings=dict(values.get("final_settings", {})), defaults=bool(values.get("defaults", True)),
                  reuse=[resolve(path.parent, r) for r in values.get("reuse", [])])
    check_study(study, where)
    return study


def resolve(base: Path, folder: str) -> Path:
    """A reuse folder: as given when it exists from here, else relative to the study file's folder or to its
    parent (the project root, for a file in studies/)."""
    candidates = [Path(folder), base / folder, base.parent / folder]
    return next((c for c in candidates if c.is_dir()), Path(folder))


def ints(values, where: str) -> list[int]:
    if not isinstance(values, list) or not values or not all(isinstance(v, int) and v >= 0 for v in values):
        raise UserError(f"{where} must be a non-empty list of non-negative integers, got {values!r}")
    return values


def read_arms(values: dict, where: str) -> list[Arm]:
    shared = values.get("method_options", {})
    arms = [Arm(m, m, dict(shared.get(m, {}))) for m in values.get("methods", [])]
    for i, arm in enumerate(values.get("arms", [])):
        if not isinstance(arm, dict) or "method" not in arm:
            raise UserError(f"{where}: [[arms]] entry {i} needs name and method (and options)")
        method = arm["method"]
        arms.append(Arm(arm.get("name", method), method, {**shared.get(method, {}), **arm.get("options", {})}))
    if not arms:
        raise UserError(f"{where}: no arms; give methods = [...] or [[arms]] entries")
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise UserError(f"{where}: arm names repeat ({', '.join(names)}); give each [[arms]] entry its own name")
    for arm in arms:
        try:
            method_options(arm.method)
            from bench.run import typed_method_options

            object.__setattr__(arm, "options", typed_method_options(arm.method, arm.options))
        except MethodError as error:
            raise UserError(f"{where}: arm {arm.name!r}: {error}") from None
    return arms


def check_study(study: Study, where: str) -> None:
    """Everything a study needs, before any run starts: every cell's settings build a valid RunSpec."""
    if study.reference_arm is not None and study.reference_arm not in {a.name for a in study.arms}:
        raise UserError(f"{where}: reference = {study.reference_arm!r} is not an arm "
                        f"({', '.join(a.name for a in study.arms)})")
    if study.kind == "tune":
        if study.axes:
            raise UserError(f"{where}: a tuning study has no [axes]; tune at one setting, or make it a grid study")
        if study.trials < 1:
            raise UserError(f"{where}: kind = \"tune\" needs trials = N (the same for every method), N >= 1")
        overlap = set(study.trial_seeds) & set(study.final_seeds)
        if overlap:
            raise UserError(f"{where}: trial_seeds and final_seeds share {sorted(overlap)}; selection must not see "
                            f"the final runs' seeds")
        if study.select_metric == "rfid" and not study.settings.get("fid", True):
            raise UserError(f"{where}: select = \"rfid\" needs fid = true for the trials")
        if "eval_split" in study.settings:
            raise UserError(f"{where}: eval_split is set by the study (val for trials, test for the final runs)")
    for key, values in study.axes.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}: [axes] {key} must be a non-empty list of values")
    try:
        study.cells()
    except (UserError, MethodError) as error:
        raise UserError(f"{where}: {error}") from None


# --- running ---------------------------------------------------------------------------------------------------

def study_dir(study: Study, out: Path) -> Path:
    return out / study.name


def find_record(study: Study, cell: Cell, out: Path) -> Path | None:
    """The cell's record: in the study's folder, else the same run id in one of the study's `reuse` folders (an
    identical run recorded elsewhere, e.g. the committed set); None when it has not run."""
    candidates = [study_dir(study, out) / cell.spec.experiment / f"{cell.spec.run_id()}.json",
                  *(folder / f"{cell.spec.run_id()}.json" for folder in study.reuse)]
    return next((path for path in candidates if path.is_file()), None)


def estimate_seconds(cell: Cell, done: list[dict]) -> float | None:
    """A cell's wall time from finished records of the same method (seconds per step x steps, plus the median
    evaluation time of runs with the same fid setting), from those at the cell's codebook size where there are
    any (a K = 16384 step costs several K = 256 steps); None where no record of the method exists."""
    same_method = [r for r in done if r["spec"]["method"] == cell.method and r["cost"].get("train_s")]
    if not same_method:
        return None
    same_k = [r for r in same_method if r["spec"].get("codebook_size") == cell.spec.codebook_size]
    pool = same_k or same_method
    per_step = statistics.median(r["cost"]["train_s"] / max(r["spec"]["steps"], 1) for r in pool)
    evals = [r["cost"].get("eval_s") or 0.0 for r in pool if r["spec"].get("fid") == cell.spec.fid]
    return per_step * cell.spec.steps + (statistics.median(evals) if evals else 0.0)


def dry_run(study: Study, out: Path, known: Path) -> None:
    """The grid, and its cost estimated from the records under `known` (results/ by default)."""
    selection = read_selection(study, out)
    cells = study.cells(selection)
    done = [r for r in read_records_quietly(known)]
    total, unknown = 0.0, 0
    print(f"study {study.name} ({study.kind}, figure {study.figure}): {len(cells)} runs"
          + ("" if study.kind == "grid" or selection else " of the trials (final and default runs follow the "
                                                        "selection)"))
    for cell in cells:
        finished = find_record(study, cell, out) is not None
        seconds = None if finished else estimate_seconds(cell, done)
        if not finished:
            total += seconds or 0.0
            unknown += seconds is None
        cost = "done" if finished else (f"~{seconds:.0f} s" if seconds is not None else "? (no record of the method)")
        where = " ".join(f"{k}={v}" for k, v in cell.point.items())
        trial = f" trial {cell.trial}" if cell.trial is not None else ""
        print(f"  {cell.phase:7} {cell.arm:16} {where} seed {cell.seed}{trial}  {cell.spec.run_id()}  {cost}")
    print(f"estimated cost of the runs to do: {total / 3600:.2f} h at the speed of the records under {known}"
          + (f" ({unknown} run(s) of methods with no record not counted)" if unknown else ""))


def read_records_quietly(folder: Path) -> list[dict]:
    paths = [p for p in folder.rglob("*.json") if p.parent.name != "report"] if folder.is_dir() else []
    records = []
    for path in paths:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and "spec" in record and "cost" in record:
            records.append(record)
    return records


def selection_path(study: Study, out: Path) -> Path:
    return study_dir(study, out) / "selection.json"


def read_selection(study: Study, out: Path) -> dict | None:
    path = selection_path(study, out)
    if study.kind != "tune" or not path.is_file():
        return None
    return json.loads(path.read_text())


def run_cells(study: Study, cells: list[Cell], out: Path, scratch: Path, launcher: str, options: dict) -> None:
    """Each distinct run without a record once (a default run and a final run can be the same run)."""
    from bench.launch import LAUNCHERS

    todo = list({c.spec.run_id(): c.spec for c in cells if find_record(study, c, out) is None}.values())
    if todo:
        LAUNCHERS[launcher](todo, study_dir(study, out), scratch / study.name, options)


def run_study(study: Study, out: Path, scratch: Path, launcher: str, options: dict) -> int:
    run_cells(study, study.cells(), out, scratch, launcher, options)
    if study.kind == "tune":
        unfinished = [c for c in study.cells() if find_record(study, c, out) is None]
        if unfinished:
            print(f"{len(unfinished)} trial(s) have no record (failed, or queued with --no-wait); rerun to complete "
                  f"them: selection waits for every trial", file=sys.stderr)
            return 1
        selection = study.select(study_dir(study, out))
        write_atomic(selection_path(study, out), json.dumps(selection, indent=1) + "\n")
        for arm, chosen in selection["methods"].items():
            trial = chosen["trials"][chosen["winner"]]
            print(f"selected {arm}: trial {chosen['winner']} {trial['settings'] or '(defaults)'} "
                  f"(validation {selection['metric']} {trial['value']})")
        run_cells(study, [c for c in study.cells(selection) if c.phase != "trial"], out, scratch, launcher, options)
    write_study_report(study, out)
    missing = [c for c in study.cells(read_selection(study, out)) if find_record(study, c, out) is None]
    if missing:
        print(f"{len(missing)} run(s) of the study have no record yet (failed, or still queued with --no-wait); "
              f"rerun the same command to complete them", file=sys.stderr)
    return 1 if missing else 0


def study_records(study: Study, out: Path) -> list[tuple[Cell, dict | None]]:
    """Every cell of the study with its record (None where it has not run), each record with its `_path`."""
    pairs = []
    for cell in study.cells(read_selection(study, out)):
        path = find_record(study, cell, out)
        pairs.append((cell, {**json.loads(path.read_text()), "_path": str(path)} if path else None))
    return pairs


def write_study_report(study: Study, out: Path, report: Path | None = None) -> Path:
    """The study's tables and figures, in <out>/<name>/report/ unless `report` says where."""
    from bench.report.studies import build_study_report

    report = report or study_dir(study, out) / "report"
    markdown, written, notes = build_study_report(study, study_records(study, out), report,
                                                  selection=read_selection(study, out))
    print(markdown)
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {len(written)} files under {report}")
    return report


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.study", description=__doc__.split("\n")[0])
    p.add_argument("study", help="a study file (studies/*.toml)")
    p.add_argument("--dry-run", action="store_true", help="print the grid and its estimated cost, run nothing")
    p.add_argument("--report-only", action="store_true", help="rewrite the study's report from its records")
    p.add_argument("--out", default="results/studies", help="where studies' records go (default results/studies)")
    p.add_argument("--scratch", default="runs/studies", help="checkpoints (default runs/studies)")
    p.add_argument("--known", default="results", help="records whose speed --dry-run estimates from")
    p.add_argument("--launcher", default="inline", help="inline, local or slurm, as for bench.run")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        study = load_study(args.study)
        out, scratch = Path(args.out), Path(args.scratch)
        if args.dry_run:
            dry_run(study, out, Path(args.known))
            return 0
        if args.report_only:
            write_study_report(study, out)
            return 0
        from bench.launch import LAUNCHERS

        if args.launcher not in LAUNCHERS:
            raise UserError(f"unknown launcher {args.launcher!r}; valid launchers: {', '.join(LAUNCHERS)}")
        from bench.run import check_buildable

        check_buildable([c.spec for c in study.cells()])
        return run_study(study, out, scratch, args.launcher, {"quiet": args.quiet, "cluster_flags": {}})
    except (UserError, MethodError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
