"""RunSpec: everything one run needs, as a plain serializable value, and the presets that fill it."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from bench import UserError


@dataclass
class RunSpec:
    method: str
    dataset: str = "photos"
    model: str = "vqvae"
    seed: int = 0
    experiment: str = "default"
    # training
    steps: int = 500
    batch_size: int = 128
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    warmup_steps: int = 50
    recon_loss: str = "mse"  # "mse" or "l1"
    # model (vqvae); model_options carries the rest for other models
    codebook_size: int = 512
    code_dim: int = 64
    width: int = 128
    res_blocks: int = 2
    res_width: int = 32
    downsample: int = 4
    model_options: dict = field(default_factory=dict)
    method_options: dict = field(default_factory=dict)
    # evaluation
    eval_every: int = 100  # validation curve points; 0 = only at the end
    eval_batch_size: int = 500
    fid: bool = True  # rFID and KID of the test reconstructions (standard Inception weights, found offline)
    gfid: bool = False  # train the stage-2 prior, sample, record gFID and the prior's bits per code
    prior_options: dict = field(default_factory=dict)  # bench.prior.PriorConfig fields (layers, steps, samples...)
    # runtime: how, not what; excluded from the run id
    ckpt_every: int = 100
    device: str = "auto"
    amp: str = "auto"  # "auto" = bf16 autocast on CUDA, off on the CPU; "off"; "bf16"; "fp16"
    threads: int = 0  # torch CPU threads; 0 = torch's default
    data_root: str | None = None
    download: bool = False
    inception_weights: str | None = None  # a file of FID Inception weights; else found as bench.inception says

    RUNTIME_FIELDS = ("ckpt_every", "device", "threads", "data_root", "download", "experiment", "inception_weights")

    def run_id(self) -> str:
        """Derived from what determines the result, so the same spec launched twice is the same run."""
        identity = {k: v for k, v in self.to_dict().items() if k not in self.RUNTIME_FIELDS}
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
        dataset = self.dataset.replace("/", "_").replace(":", "-")
        return f"{self.method}-{dataset}-{self.model}-s{self.seed}-{digest}"

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: dict) -> "RunSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise UserError(f"unknown setting(s) {', '.join(unknown)}; valid settings: {', '.join(sorted(names))}")
        values = dict(values)
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        return cls(**values)

    def validate(self) -> None:
        positive = ("steps", "batch_size", "codebook_size", "code_dim", "width", "res_blocks", "eval_batch_size")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        for name in ("eval_every", "ckpt_every", "warmup_steps", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UserError(f"--{name.replace('_', '-')} must be a non-negative integer, got {value!r}")
        if not self.lr > 0:
            raise UserError(f"--lr must be positive, got {self.lr!r}")
        if self.recon_loss not in ("mse", "l1"):
            raise UserError(f"recon_loss must be 'mse' or 'l1', got {self.recon_loss!r}")
        if self.amp not in ("auto", "off", "bf16", "fp16"):
            raise UserError(f"--amp must be one of auto, off, bf16, fp16; got {self.amp!r}")
        if self.downsample not in (2, 4, 8, 16):
            raise UserError(f"downsample must be 2, 4, 8 or 16, got {self.downsample!r}")


# --- presets: small TOML files in bench/presets/ whose keys are RunSpec fields --------------------------------

def list_presets() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("bench.presets").iterdir() if p.name.endswith(".toml"))


def load_preset(name: str) -> dict:
    """A preset's values; a path to a .toml file works as well as a bundled name."""
    path = Path(name)
    if path.suffix == ".toml" and path.exists():
        text = path.read_text()
    else:
        candidate = resources.files("bench.presets") / f"{name}.toml"
        if not candidate.is_file():
            raise UserError(f"unknown preset {name!r}; valid presets: {', '.join(list_presets())} (or a .toml path)")
        text = candidate.read_text()
    values = tomllib.loads(text)
    values.pop("description", None)
    RunSpec.from_dict({"method": "ste", **{k: v for k, v in values.items() if k != "methods"}})  # check keys
    return values
