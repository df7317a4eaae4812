"""The README's Layout section names every module of bench/ and methods/, one line each, and nothing that is gone."""
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
