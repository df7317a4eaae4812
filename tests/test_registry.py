"""A new method is one module with one @register: discovered, listed, run, reported and coloured, no other edit."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from methods import palette_slots, reference_method, register
from methods.registry import PALETTE_SIZE
from tests.conftest import ROOT, TINY

THROWAWAY = '''
import torch
from torch import nn

from methods.base import Quantizer, QuantizerOutput, from_rows, to_rows
from methods.registry import register


@register("mine")
class Mine(Quantizer):
    """Nearest code of a learned table, straight-through, written here and nowhere else."""

    def __init__(self, dim: int, codebook_size: int, commitment_weight: float = 0.25):
        super().__init__()
        self.dim, self.codebook_size, self.commitment_weight = dim, codebook_size, commitment_weight
        self.codebook = nn.Parameter(torch.randn(codebook_size, dim))

    def forward(self, z):  # (B, D, H, W)
        rows = to_rows(z)
        idx = torch.cdist(rows.detach(), self.codebook.detach()).argmin(1)
        chosen = self.codebook[idx]
        aux = (chosen - rows.detach()).pow(2).mean() + self.commitment_weight * (rows - chosen.detach()).pow(2).mean()
        quantized = from_rows(rows + (chosen - rows).detach(), z.shape)
        return QuantizerOutput(quantized, idx.view(z.shape[0], *z.shape[2:]), aux, (chosen - rows).pow(2).mean().detach())

    def decode_indices(self, indices):  # (B, H, W) -> (B, D, H, W)
        return self.codebook[indices].permute(0, 3, 1, 2)
'''


def in_copy(copy, *args):
    env = {**os.environ, "PYTHONPATH": str(copy)}
    return subprocess.run([sys.executable, *args], cwd=copy, env=env, capture_output=True, text=True, timeout=600)


def test_a_method_module_dropped_into_methods_appears_in_list_runs_report_and_figures(tmp_path):
    copy = tmp_path / "project"
    for folder in ("bench", "methods"):
        shutil.copytree(ROOT / folder, copy / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "methods" / "mine.py").write_text(THROWAWAY)  # the whole change

    listed = in_copy(copy, "-m", "bench.run", "--list")
    assert listed.returncode == 0, listed.stderr
    assert any(line.split()[:1] == ["mine"] for line in listed.stdout.splitlines())  # its own line, with its options
    assert "commitment_weight=0.25" in next(line for line in listed.stdout.splitlines() if line.split()[:1] == ["mine"])

    run = in_copy(copy, "-m", "bench.run", "--methods", "mine,ste", "--steps", "3", *TINY, "--quiet",
                  "--out", str(tmp_path / "results"), "--scratch", str(tmp_path / "runs"))
    assert run.returncode == 0, run.stderr
    records = [json.loads(p.read_text()) for p in (tmp_path / "results").rglob("*.json")]
    assert sorted(r["spec"]["method"] for r in records) == ["mine", "ste"]

    report = in_copy(copy, "-m", "bench.report", str(tmp_path / "results"), "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr
    quality = next((tmp_path / "report").rglob("quality.csv")).read_text()
    assert "mine" in quality
    figures = {p.name for p in (tmp_path / "report").rglob("*.png")}
    assert {"bar_mse.png", "curves.png", "code_frequency.png", "reconstructions.png"} <= figures, figures

    colours = in_copy(copy, "-c", "import methods; from bench.report.figures import method_colour; "
                                  "print(' '.join(f'{m}={method_colour(m)}' for m in methods.list_methods()))")
    assert colours.returncode == 0, colours.stderr
    every = dict(pair.split("=") for pair in colours.stdout.split())
    assert "mine" in every and set(every) >= {"ste", "mq", "fsq"}
    assert len(set(every.values())) == len(every)  # mine's colour is its own


def test_palette_slots_are_distinct_and_a_claimed_slot_cannot_be_claimed_twice():
    slots = palette_slots(["unregistered-a", "unregistered-b"])
    assert len(set(slots.values())) == len(slots)
    registered = palette_slots()
    assert {m: slots[m] for m in registered} == registered  # extra names never move a registered method's colour
    assert palette_slots(["aaa"])["aaa"] not in registered.values()  # sorted before every name, still no clash
    assert all(0 <= s < PALETTE_SIZE for s in slots.values())
    with pytest.raises(RuntimeError, match="already 'ste'"):
        register("another", palette_slot=slots["ste"])(lambda dim, codebook_size: None)


def test_there_is_one_reference_method():
    assert reference_method() == "ste"
    with pytest.raises(RuntimeError, match="already the reference"):
        register("another-reference", reference=True)(lambda dim, codebook_size: None)
