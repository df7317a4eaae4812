"""Building blocks of the definition tests, written independently of methods/: seeded inputs, the (B, C, H, W) <->
rows reshapes and the nearest code by brute-force broadcasting (never methods.base.nearest_code)."""
import torch
from torch import nn

D, K = 8, 16  # the code dimension and codebook size of the definition tests


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def feature_map(seed=0, b=2, h=4, w=4, dim=D, dtype=torch.float64, scale=1.0):
    return (torch.randn(b, dim, h, w, generator=gen(seed), dtype=torch.float64) * scale).to(dtype)


def rows_of(x):
    """(B, C, H, W) -> (B*H*W, C), positions in row-major (b, h, w) order."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def map_of(rows, like):
    b, _, h, w = like.shape
    return rows.reshape(b, h, w, -1).permute(0, 3, 1, 2)


def nearest(rows, codebook):
    """Nearest code by the full squared Euclidean distance, by broadcasting: (N, C), (K, C) -> (N,)."""
    return ((rows[:, None, :] - codebook[None, :, :]) ** 2).sum(-1).argmin(1)


class CallWith(nn.Module):
    """Lets torch.func.functional_call swap a model's parameters for the duration of an arbitrary call."""

    def __init__(self, model, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, *args):
        return self.fn(*args)
