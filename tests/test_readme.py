"""The README states what the repository holds: its Layout section names every module of bench/ and methods/, one
line each, and nothing that is gone; its tuned table shows the committed records' and reports' numbers."""
import json
import re

from tests.conftest import ROOT


def test_the_layout_section_lists_every_module_once():
    text = (ROOT / "README.md").read_text()
    block = text[text.index("## Layout"):].split("```")[1]
    listed = [line.split()[0] for line in block.strip().splitlines()]
    modules = sorted(str(p.relative_to(ROOT)) for folder in ("bench", "methods") for p in (ROOT / folder).rglob("*.py")
                     if not re.search(r"bench/presets/", str(p)))
    named = [entry for entry in listed if entry.endswith(".py")]
    assert sorted(named) == modules
    assert len(named) == len(set(named))


def test_the_tuned_table_shows_the_committed_reports_numbers():
    """Every cell of every row of the README's tuned table as the reports have it, at the printed precision: the tuned
    test metrics and paired differences to ema (results/studies/tuned/report/), the default table's (the committed
    set's records, results/photos-300) and validation defaults -> tuned (tuned_vs_default); a regenerated report with other numbers fails."""
    import pandas as pd

    report = ROOT / "results" / "studies" / "tuned" / "report"
    final = pd.read_csv(report / "final.csv").set_index(["method", "metric"])["mean"]
    differences = pd.read_csv(report / "final_differences.csv").set_index(["method", "metric"])
    records = [json.loads(path.read_text()) for path in (ROOT / "results" / "photos-300").glob("*.json")]
    default = pd.DataFrame([{"method": r["spec"]["method"], **r["metrics"]} for r in records]).groupby("method").mean(
        numeric_only=True)  # from the records: the report's CSV keeps 6 digits, 199.95 of a mean of 199.9502
    validation = pd.read_csv(report / "tuned_vs_default.csv").set_index("method")
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### The tuned comparison"):text.index("## SLURM")]
    rows = [line for line in section.splitlines() if re.match(r"\| `[\w-]+` \|", line)]
    assert sorted(re.match(r"\| `([\w-]+)`", row).group(1) for row in rows) == sorted(final.index.levels[0])
    for row in rows:
        raw = [cell.strip() for cell in row.strip("|").split("|")]
        cells = [cell.strip("*") for cell in raw]
        method = cells[0].strip("`")
        assert cells[1].split(" ± ")[0] == f"{final[(method, 'mse')]:.5f}", row
        assert cells[2].split(" ± ")[0] == f"{final[(method, 'rfid')]:.1f}", row
        assert cells[3].split(" ± ")[0] == f"{final[(method, 'usage')]:.2f}", row
        assert cells[6] == f"{default.loc[method, 'mse']:.4f}, {default.loc[method, 'rfid']:.1f}", row
        chosen = validation.loc[method]
        assert cells[7] == (f"{chosen['val_default']:.4f} → {chosen['val_tuned']:.4f}"
                            + ("" if chosen["winner"] else " (defaults won)")), row
        for column, metric, digits in ((4, "mse", 4), (5, "rfid", 1)):
            cell = cells[column]
            if method == "ema":
                assert cell == "(reference)"
                continue
            d = differences.loc[(method, metric)]
            assert d["reference"] == "ema"
            shown = f"{d['mean_difference']:+.{digits}f} [{d['ci_low']:+.{digits}f}, {d['ci_high']:+.{digits}f}]"
            assert cell == shown, row
            assert raw[column].startswith("**") == bool(d["excludes_zero"]), row  # bold: the interval excludes 0
