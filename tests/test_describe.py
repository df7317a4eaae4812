"""`--list` and `--describe`: the CLI explains every method, model and preset from their declarations."""
import json

import pytest

from bench.run import main
from bench.spec import list_presets, preset_values
from methods import list_methods, method_options


def test_list_shows_every_method_with_its_options_and_every_preset_with_its_description(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    for method in list_methods():
        for option, default in method_options(method).items():
            assert f"{option}={default!r}" in lines[method]
    for preset in list_presets():
        assert preset_values(preset)["description"].split(". ")[0] in lines[preset]
    assert "perceptual_weight=1.0" in lines["vqgan"] and "init='default'" in lines["vqvae"]


def test_describe_a_preset_prints_the_resolved_runs(capsys):
    assert main(["--describe", "mq-cifar10-vqvae"]) == 0
    out = capsys.readouterr().out
    runs = [json.loads(block) for block in ("{" + b for b in out.split("\n{")[1:])]
    assert [r["spec"]["method"] for r in runs] == preset_values("mq-cifar10-vqvae")["methods"]
    assert {r["spec"]["steps"] for r in runs} == {preset_values("mq-cifar10-vqvae")["steps"]}


@pytest.mark.parametrize("name, expected", [("mq", "outer_lr = 0.0001  (a number)"),
                                            ("vqgan", "disc_schedule = 'constant'  (one of constant, cosine)")])
def test_describe_a_method_or_model_prints_its_typed_options(name, expected, capsys):
    assert main(["--describe", name]) == 0
    assert expected in capsys.readouterr().out


def test_describe_an_unknown_name_is_one_line_and_exit_2(capsys):
    assert main(["--describe", "nosuch"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "not a method, model or preset" in err
