"""LPIPS on VGG16 (Zhang et al. 2018, "v0.1"): the perceptual term of VQGAN's generator loss.

The distance between two images x, y in [-1, 1]: both pass a fixed per-channel affine map (the LPIPS scaling
layer), then torchvision's VGG16 `features` up to relu5_3; at relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 the
features are normalized to unit length over channels, their squared difference is weighted per channel by a
learned non-negative 1x1 head, averaged over space and summed over the five taps. The heads carry no dropout
here (taming-transformers keeps LPIPS in eval mode; a deterministic loss keeps resume and MQ's finite
differences exact).

Weights, all read from disk, never downloaded unless asked:
  - VGG16: torchvision's ImageNet checkpoint (`vgg16-397923af.pth`), from torch hub's cache
    (`$TORCH_HOME/hub/checkpoints/`) or a path the user gives; `download=True` lets torchvision fetch it.
  - the LPIPS v0.1 heads (`vgg.pth`, 7 KB): shipped inside torchmetrics' wheel (a dependency already), or the
    `lpips` package's copy, or a path the user gives.
Both are frozen: they are stored as non-persistent buffers, so they are not parameters (no optimizer, not
counted as the model's parameters) and not written into checkpoints (they come from their files every time).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench import UserError

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"  # torchvision's VGG16_Weights.IMAGENET1K_V1
VGG16_FILE = VGG16_URL.rsplit("/", 1)[-1]

# torchvision's vgg16().features: (index of the conv in `features`, in channels, out channels), grouped into the
# five LPIPS stages; every stage after the first starts with a 2x2 max-pool, and ends at the tap after a ReLU.
VGG16_STAGES = (
    ((0, 3, 64), (2, 64, 64)),  # relu1_2
    ((5, 64, 128), (7, 128, 128)),  # relu2_2
    ((10, 128, 256), (12, 256, 256), (14, 256, 256)),  # relu3_3
    ((17, 256, 512), (19, 512, 512), (21, 512, 512)),  # relu4_3
    ((24, 512, 512), (26, 512, 512), (28, 512, 512)),  # relu5_3
)
TAP_CHANNELS = tuple(stage[-1][2] for stage in VGG16_STAGES)  # (64, 128, 256, 512, 512)
# the LPIPS scaling layer: inputs in [-1, 1] -> roughly ImageNet-normalized
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class LPIPS(nn.Module):
    """LPIPS-VGG16 distance. forward(x, y): two float batches (B, 3, H, W) in [-1, 1] -> (B,) distances.

    Gradients flow to the inputs, never to the weights (buffers). Build with `from_files`, or `random` in tests.
    """

    def __init__(self, vgg: dict[str, Tensor], heads: list[Tensor], note: dict | None = None):
        super().__init__()
        for stage in VGG16_STAGES:
            for index, c_in, c_out in stage:
                weight, bias = vgg[f"{index}.weight"], vgg[f"{index}.bias"]
                if tuple(weight.shape) != (c_out, c_in, 3, 3) or tuple(bias.shape) != (c_out,):
                    raise ValueError(f"features.{index} has shape {tuple(weight.shape)}, "
                                     f"VGG16 has {(c_out, c_in, 3, 3)}")
                self.register_buffer(f"conv{index}_weight", weight.detach().float().clone(), persistent=False)
                self.register_buffer(f"conv{index}_bias", bias.detach().float().clone(), persistent=False)
        for k, (head, channels) in enumerate(zip(heads, TAP_CHANNELS)):
            if tuple(head.shape) != (1, channels, 1, 1):
                raise ValueError(f"LPIPS head {k} has shape {tuple(head.shape)}, expected {(1, channels, 1, 1)}")
            self.register_buffer(f"head{k}", head.detach().float().clone(), persistent=False)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.note = note or {}  # where the weights came from, for the record

    def features(self, x: Tensor) -> list[Tensor]:
        """(B, 3, H, W) scaled input -> the five taps, (B, C_k, H / 2^k, W / 2^k)."""
        taps = []
        for s, stage in enumerate(VGG16_STAGES):
            if s > 0:
                x = F.max_pool2d(x, 2)
            for index, _, _ in stage:
                weight = getattr(self, f"conv{index}_weight")
                x = F.relu(F.conv2d(x, weight.to(x.dtype), getattr(self, f"conv{index}_bias").to(x.dtype), padding=1))
            taps.append(x)
        return taps

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        n = x.shape[0]
        # one pass over both batches: half the kernel launches, and a larger batch for the GPU
        both = (torch.cat([x, y]) - self.shift.to(x.dtype)) / self.scale.to(x.dtype)
        distance = x.new_zeros(n, dtype=torch.float32)
        for k, tap in enumerate(self.features(both)):
            tap = tap.float()
            tap = tap / (tap.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # unit length over channels
            diff = (tap[:n] - tap[n:]).pow(2)  # (B, C, h, w)
            distance = distance + F.conv2d(diff, getattr(self, f"head{k}")).mean((1, 2, 3))
        return distance

    # --- construction ------------------------------------------------------------------------------------

    @classmethod
    def random(cls, generator: torch.Generator | None = None) -> "LPIPS":
        """Randomly initialized VGG16 and heads: FOR TESTS ONLY (a loss of the right shape and cost, no meaning).

        Kaiming-normal convolutions as torchvision initializes VGG (PyTorch's default init makes deep features
        vanish), non-negative heads as trained LPIPS heads are. Drawn from the global RNG unless `generator`.
        """
        vgg = {}
        for stage in VGG16_STAGES:
            for index, c_in, c_out in stage:
                std = (2.0 / (c_out * 9)) ** 0.5  # kaiming normal, fan_out, ReLU
                vgg[f"{index}.weight"] = torch.randn(c_out, c_in, 3, 3, generator=generator) * std
                vgg[f"{index}.bias"] = torch.zeros(c_out)
        heads = [torch.rand(1, c, 1, 1, generator=generator) for c in TAP_CHANNELS]
        return cls(vgg, heads, {"weights": "random (tests only)"})

    @classmethod
    def from_files(cls, vgg_path: str | Path | None = None, heads_path: str | Path | None = None,
                   download: bool = False) -> "LPIPS":
        """The real LPIPS-VGG16. vgg_path None: torch hub's cache (downloaded there first if `download`);
        heads_path None: the copy inside torchmetrics (or the lpips package). Missing files -> one UserError."""
        vgg_file = resolve_vgg16(vgg_path, download)
        heads_file = resolve_heads(heads_path)
        try:
            state = torch.load(vgg_file, map_location="cpu", weights_only=True)
        except Exception as error:
            raise UserError(f"VGG16 weights {vgg_file} are unreadable ({type(error).__name__}: {error}); "
                            f"replace the file with torchvision's {VGG16_FILE}") from None
        # torchvision's whole-model checkpoint says features.N.weight; a features-only state dict says N.weight
        vgg = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}
        try:
            heads_state = torch.load(heads_file, map_location="cpu", weights_only=True)
            heads = [heads_state[f"lin{k}.model.1.weight"] for k in range(len(TAP_CHANNELS))]
        except Exception as error:
            raise UserError(f"LPIPS heads {heads_file} are unreadable ({type(error).__name__}: {error}); pass "
                            f"model_options lpips_heads_path=FILE (LPIPS v0.1 vgg.pth)") from None
        try:
            return cls(vgg, heads, {"vgg16": str(vgg_file), "heads": str(heads_file)})
        except (KeyError, ValueError) as error:
            raise UserError(f"{vgg_file} is not torchvision's VGG16 checkpoint ({error}); pass "
                            f"model_options perceptual_weights_path=FILE with {VGG16_FILE}") from None


def missing_weights_message(where: str) -> str:
    return (f"the VQGAN perceptual loss needs ImageNet VGG16 weights and found none ({where}); give a file with "
            f"--set model_options=\"{{'perceptual_weights_path': '/path/{VGG16_FILE}'}}\" (torchvision's VGG16 "
            f"checkpoint), put {VGG16_FILE} into torch hub's cache {Path(torch.hub.get_dir()) / 'checkpoints'}, "
            f"pass --download on a machine with internet access, or train without it: --perceptual-weight 0")


def resolve_vgg16(path: str | Path | None, download: bool) -> Path:
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise UserError(missing_weights_message(f"perceptual_weights_path {path} is not a file"))
        return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE
    if not cached.is_file() and download:
        try:
            torch.hub.load_state_dict_from_url(VGG16_URL, progress=False, check_hash=True)
        except Exception as error:  # offline machines fail at name resolution
            raise UserError(missing_weights_message(f"downloading {VGG16_URL} failed: {error}")) from None
    if not cached.is_file():
        raise UserError(missing_weights_message(f"no {cached}"))
    return cached


def bundled_heads() -> Path | None:
    """LPIPS v0.1 VGG heads shipped inside an installed wheel: torchmetrics first, then lpips."""
    for package, relative in (("torchmetrics", "functional/image/lpips_models/vgg.pth"),
                              ("lpips", "weights/v0.1/vgg.pth")):
        spec = importlib.util.find_spec(package)  # locates the package without importing it
        if spec is not None and spec.submodule_search_locations:
            candidate = Path(list(spec.submodule_search_locations)[0]) / relative
            if candidate.is_file():
                return candidate
    return None


def resolve_heads(path: str | Path | None) -> Path:
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise UserError(f"lpips_heads_path {path} is not a file; pass LPIPS v0.1 vgg.pth or leave it unset "
                            f"to use the copy inside torchmetrics")
        return path
    found = bundled_heads()
    if found is None:
        raise UserError("the LPIPS v0.1 VGG heads (vgg.pth) were not found inside torchmetrics or lpips; "
                        "reinstall torchmetrics or pass model_options lpips_heads_path=FILE, or train with "
                        "--perceptual-weight 0")
    return found
