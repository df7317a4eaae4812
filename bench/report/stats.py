"""The statistics the tables show, and how a number is written: fixed decimals, mean ± std over seeds, the
paired-by-seed difference of two methods with its t-interval."""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
from scipy.stats import t as student_t


def fmt(value: float, digits: int, sign: bool = False) -> str:
    """Fixed decimals; never "-0.00"."""
    if value is None or pd.isna(value):
        return "n/a"
    text = f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"
    if float(text) == 0:
        text = f"{0.0:+.{digits}f}" if sign else f"{0.0:.{digits}f}"
    return text


def mean_sd(values: pd.Series, digits: int) -> str:
    """"mean ± std" (ddof 1) of the values; the mean alone for one value (no spread to show), n/a for none."""
    if values.empty:
        return "n/a"
    text = fmt(values.mean(), digits)
    return text + (f" ± {fmt(values.std(ddof=1), digits)}" if len(values) > 1 else "")


@dataclass(frozen=True)
class PairedDifference:
    """mean over seeds of (method - reference), and its confidence interval; None where n < 2."""
    n: int
    mean: float | None
    low: float | None
    high: float | None

    @property
    def excludes_zero(self) -> bool | None:
        return None if self.mean is None else bool(self.low > 0 or self.high < 0)


def paired_difference(values: pd.Series, reference: pd.Series, confidence: float = 0.95) -> PairedDifference:
    """values and reference indexed by seed. Seeds only one side has, or null on one side, are dropped; the
    interval is mean ± t_{(1+confidence)/2, n-1} * std(ddof 1) / sqrt(n) of the paired differences."""
    both = pd.concat([values.rename("value"), reference.rename("reference")], axis=1).dropna().sort_index()
    differences = (both["value"] - both["reference"]).to_numpy(dtype=float)
    n = len(differences)
    if n < 2:
        return PairedDifference(n, None, None, None)
    mean = float(differences.mean())
    half = float(student_t.ppf(0.5 + confidence / 2, n - 1) * differences.std(ddof=1) / math.sqrt(n))
    return PairedDifference(n, mean, mean - half, mean + half)
