"""Index backpropagation quantization (Shi et al. 2024, "Taming Scalable Visual Tokenizer for Autoregressive Image
Generation", IBQ).

`ibq`: the logits of every position against all K codes are dot products, l = z C^T; the code is the argmax of
softmax(l) (the largest dot product, not the nearest code by L2), and the decoder sees it exactly, through the
straight-through estimator over the softmax, not over z:

    z_q = (one_hot(argmax l) - sg(softmax(l)) + softmax(l)) C

So z_q's value is the chosen code C_k, while its gradient reaches every code (through the softmax's Jacobian
and l = z C^T) and reaches z only through the logits: the decoder's gradient is not copied onto z as in VQ-VAE.
That every code receives gradient at every step is the paper's answer to codebook collapse at large K.

The "double quantization loss", as the authors' code (TencentARC/Open-MAGVIT2, src/IBQ, IndexPropagationQuantize)
computes it, our reading of the paper's description:

    L_Q = st_commitment_weight * |z_q - z|^2         the straight-through code against z, no stop-gradient:
                                                     it pulls z and (through the softmax) every code together
        + commitment_weight * |sg(C_k) - z|^2        z towards its hard code (VQ-VAE's commitment term)
        + codebook_weight * |C_k - sg(z)|^2          the hard code towards z (VQ-VAE's codebook term)

with weights 1, 1 and beta = 0.25 (the authors put beta on the codebook term, as taming-transformers' legacy
quantizer does; VQ-VAE puts it on the commitment term). The first term is the one that makes it "double": z is
held close both to the hard code and to the straight-through code whose gradient it receives. Means over
positions and channels.

The entropy term, on by default as in every one of the authors' IBQ configs: with p = softmax(l / T),

    entropy_weight * (sample_entropy_weight * mean H(p) - batch_entropy_weight * H(mean p)),

T = entropy_temperature = 0.01, weights 1 and 1, and entropy_weight = 0.05 (the configs' entropy_loss_weight;
the quantizer loss itself has weight 1, quant_loss_weight). As theirs: H(mean p) uses log(mean p + 1e-5).
entropy_weight=0 turns it off. The codebook starts as theirs: nn.Embedding's N(0, 1) initialization.
Native: no library has this estimator.

quant_error: mean |z - C_k|^2, the distance between the encoder output and the code the decoder sees.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from methods import collective
from methods.base import Quantizer, QuantizerOutput, from_rows, to_rows
from methods.registry import register


def entropy_terms(logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """logits (N, K) -> (mean per-sample entropy of softmax(logits / T), entropy of the mean distribution).
    Under data parallelism the mean distribution is the global batch's (averaged over the ranks' equal slices,
    with autograd), as one process computes it."""
    log_p = (logits / temperature).log_softmax(dim=1)  # (N, K)
    p = log_p.exp()
    sample_entropy = -(p * log_p).sum(1).mean()
    mean_p = collective.differentiable_mean(p.mean(0))  # (K,), the global batch's
    batch_entropy = -(mean_p * (mean_p + 1e-5).log()).sum()
    return sample_entropy, batch_entropy


@register("ibq", palette_slot=15,
          search_space={"entropy_weight": (0.01, 0.05, 0.2), "codebook_weight": (0.1, 0.25, 1.0)})
class IndexBackpropagationVQ(Quantizer):
    def __init__(
        self,
        dim: int,
        codebook_size: int,
        st_commitment_weight: float = 1.0,
        commitment_weight: float = 1.0,
        codebook_weight: float = 0.25,
        entropy_weight: float = 0.05,
        entropy_temperature: float = 0.01,
        sample_entropy_weight: float = 1.0,
        batch_entropy_weight: float = 1.0,
    ):
        super().__init__()
        self.dim, self.codebook_size = dim, codebook_size
        self.st_commitment_weight, self.commitment_weight = st_commitment_weight, commitment_weight
        self.codebook_weight, self.entropy_weight = codebook_weight, entropy_weight
        self.entropy_temperature = entropy_temperature
        self.sample_entropy_weight, self.batch_entropy_weight = sample_entropy_weight, batch_entropy_weight
        self.codebook = nn.Embedding(codebook_size, dim)  # N(0, 1), as the authors' (no re-initialization)

    def forward(self, z: Tensor) -> QuantizerOutput:  # z: (B, D, H, W)
        with torch.autocast(z.device.type, enabled=False):
            work = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
            rows = to_rows(work)  # (N, D)
            codebook = self.codebook.weight.to(rows.dtype)  # (K, D)
            logits = rows @ codebook.t()  # (N, K)
            soft = logits.softmax(dim=1)
            idx = logits.detach().argmax(1)  # (N,): the argmax of the softmax
            chosen = codebook.index_select(0, idx)  # (N, D): one_hot @ C, the hard code
            # (one_hot - sg(soft) + soft) @ C = C_k + (soft - sg(soft)) @ C: the second product is zero in value
            # and carries the softmax's gradient to every code and to z
            straight_through = chosen + (soft - soft.detach()) @ codebook  # (N, D)
            aux = (self.st_commitment_weight * (straight_through - rows).pow(2).mean()
                   + self.commitment_weight * (chosen.detach() - rows).pow(2).mean()
                   + self.codebook_weight * (chosen - rows.detach()).pow(2).mean())
            diagnostics = {}
            if self.entropy_weight:
                sample_entropy, batch_entropy = entropy_terms(logits, self.entropy_temperature)
                aux = aux + self.entropy_weight * (self.sample_entropy_weight * sample_entropy
                                                   - self.batch_entropy_weight * batch_entropy)
                diagnostics = {"per_sample_entropy": sample_entropy.detach(), "batch_entropy": batch_entropy.detach()}
            err = (rows.detach() - chosen.detach()).pow(2).mean()
        quantized = from_rows(straight_through, z.shape).to(z.dtype)  # (B, D, H, W)
        indices = idx.reshape(z.shape[0], z.shape[2], z.shape[3])  # (B, H, W)
        return QuantizerOutput(quantized, indices, aux, err, diagnostics)

    def decode_indices(self, indices: Tensor) -> Tensor:
        return self.codebook(indices).permute(0, 3, 1, 2)  # (B, H, W) -> (B, D, H, W)

    def export_codebook(self) -> Tensor:
        return self.codebook.weight.detach().clone()
