"""RunSpec: everything one run needs, as a plain serializable value, and the presets that fill it."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass
from typing import Literal
from importlib import resources
from pathlib import Path

from bench import UserError
from bench.options import build, check_instance, option
from methods import method_version


@dataclass
class RunSpec:
    """One run. Every field is one option: its flag (`--batch-size`), its `--set` key (`batch_size=64`), its
    preset key and its place in the record's `spec`, read and checked by bench/options.py from its type."""

    method: str = option(flag=False)
    dataset: str = option("photos", "dataset name (see --list)")
    model: str = option("vqvae", "model name (see --list)")
    seed: int = option(0, flag=False, minimum=0)  # the grid's seeds come from --seeds
    experiment: str = option("default", "experiment name; records of different experiments never mix")
    # training
    steps: int = option(500, "training steps", minimum=1)
    batch_size: int = option(128, "global batch size", minimum=1)
    lr: float = option(2e-4, "peak learning rate of the autoencoder (AdamW)", above=0)
    betas: tuple[float, float] = option((0.9, 0.99), "AdamW betas", minimum=0)
    weight_decay: float = option(0.0, "AdamW weight decay", minimum=0)
    adam_eps: float = option(1e-8, "AdamW eps (the MQ authors: 1e-7)", above=0)
    warmup_steps: int = option(50, "linear warm-up steps before the cosine decay", minimum=0)
    recon_loss: Literal["mse", "l1"] = option("mse", "reconstruction loss")
    # training-time augmentation (bench/datasets/augment.py), on training batches only
    random_crop: tuple[float, float] | None = option(
        None, "random square crops, their side a fraction in [a, b] of the shorter side, resized back", above=0)
    hflip: bool = option(False, "mirror each training image with probability one half")
    # model (vqvae); model_options carries the options of other models (bench.models.MODELS declares them)
    codebook_size: int = option(512, "K, the same for every method", minimum=1)
    code_dim: int = option(64, "D, the code dimension", minimum=1)
    width: int = option(128, "vqvae: channels of the strided convolutions", minimum=1)
    res_blocks: int = option(2, "vqvae: residual blocks", minimum=1)
    res_width: int = option(32, "vqvae: channels inside a residual block", minimum=1)
    downsample: Literal[2, 4, 8, 16] = option(4, "vqvae: downsampling factor (4: 32x32 -> 8x8 latents)")
    model_options: dict = option(flag=False, factory=dict)
    method_options: dict = option(flag=False, factory=dict)
    # evaluation
    eval_every: int = option(100, "validation curve interval in steps (0: only at the end)", minimum=0)
    eval_batch_size: int = option(500, "images per evaluation batch", minimum=1)
    eval_split: Literal["test", "val"] = option(
        "test", "the split of the final evaluation; val: a tuning trial's, whose selection never reads the test split")
    fid: bool = option(True, "rFID and KID of the test reconstructions (standard Inception weights, found offline)")
    gfid: bool = option(False, "train the stage-2 prior, sample, record gFID and the prior's bits per code")
    prior_options: dict = option(flag=False, factory=dict)  # bench.prior.PriorConfig fields (layers, steps, ...)
    # runtime: how, not what; excluded from the run id
    ckpt_every: int = option(100, "checkpoint interval in steps (0: only at the end)", minimum=0)
    device: str = option("auto", "auto (a GPU when there is one), cpu, cuda, cuda:1")
    amp: Literal["auto", "off", "bf16", "fp16"] = option("auto", "mixed precision; auto: bf16 on a GPU, off on the CPU")
    threads: int = option(0, "torch CPU threads (0: torch's default)", minimum=0)
    data_root: str | None = option(None, "folder holding the dataset (default $VQBENCH_DATA or ~/.cache/vq-bench/data)")
    download: bool = option(False, "fetch the dataset when online")
    inception_weights: str | None = option(None, "FID Inception weights file (default: found offline, see README)")
    log: tuple[str, ...] = option((), "live views: tensorboard, wandb (comma-separated; bench/tracking.py)")

    # Fields added after records were committed: part of the run id only when they differ from their default, so
    # the ids of earlier records (made when every run had the default) still hold.
    ADDED_FIELDS = ("adam_eps", "random_crop", "hflip", "eval_split")
    RUNTIME_FIELDS = ("ckpt_every", "device", "threads", "data_root", "download", "experiment", "inception_weights",
                      "log")

    def run_id(self) -> str:
        """Derived from what determines the result, so the same spec launched twice is the same run."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        identity = {k: v for k, v in self.to_dict().items()
                    if k not in self.RUNTIME_FIELDS and not (k in self.ADDED_FIELDS and v == defaults[k])}
        version = method_version(self.method)
        if version > 1:  # version 1 adds nothing, so the ids of records made before versions existed still hold
            identity["method_version"] = version
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
        dataset = self.dataset.replace("/", "_").replace(":", "-")
        return f"{self.method}-{dataset}-{self.model}-s{self.seed}-{digest}"

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: dict) -> "RunSpec":
        """A RunSpec from a mapping (a preset, a record, parsed flags): every value typed and bounded."""
        return build(cls, values, "setting(s)")

    def validate(self) -> None:
        """Every field against its declared type and bounds, and the model's and the prior's option tables."""
        check_instance(self)
        from bench.models import model_options
        from bench.prior import prior_config

        model_options(self)
        prior_config(self)


# --- presets: small TOML files in bench/presets/ whose keys are RunSpec fields --------------------------------

def read_toml(source: str | Path, name: str | None = None) -> dict:
    """A TOML file's (or text's) values; a syntax error is one UserError naming the file and the line."""
    text = source.read_text() if isinstance(source, Path) else source
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"preset {name or source} is not valid TOML: {error}; fix the file") from None


def list_presets() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("bench.presets").iterdir() if p.name.endswith(".toml"))


def preset_values(name: str) -> dict:
    """A preset's raw values, description included; a path to a .toml file works as well as a bundled name."""
    path = Path(name)
    if path.suffix == ".toml" and path.exists():
        return read_toml(path, name)
    candidate = resources.files("bench.presets") / f"{name}.toml"
    if not candidate.is_file():
        raise UserError(f"unknown preset {name!r}; valid presets: {', '.join(list_presets())} (or a .toml path)")
    return read_toml(candidate.read_text(), name)


def load_preset(name: str) -> dict:
    """A preset's settings (RunSpec fields, `methods`, `method_options`), checked; its description dropped."""
    values = preset_values(name)
    values.pop("description", None)
    RunSpec.from_dict({"method": "ste", **{k: v for k, v in values.items() if k not in ("methods", "method_options")}})
    return values
