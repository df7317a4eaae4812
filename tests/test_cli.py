"""Bad input: one clear line on stderr, exit code 2, no record written."""
import pytest

from bench.run import build_specs, main, parser
from bench.train import Trainer
from tests.conftest import TINY, run_cli


def records(out):
    return list(out.rglob("*.json")) if out.exists() else []


BAD = {
    "unknown method": (["--methods", "ste,nosuch"], "valid methods: "),
    "unknown dataset": (["--methods", "ste", "--dataset", "mnist9"], "valid datasets: "),
    "zero steps": (["--methods", "ste", "--steps", "0"], "--steps must be at least 1"),
    "negative codebook size": (["--methods", "ste", "--codebook-size", "-3"], "--codebook-size must be at least 1"),
    "non-integer codebook size": (["--methods", "ste", "--codebook-size", "12.5"], "--codebook-size must be an integer"),
    "unknown method option": (["--methods", "ste", "--set", "ste.bogus=1"], "has no option bogus"),
    "unknown setting": (["--methods", "ste", "--set", "bogus=1"], "unknown setting bogus"),
    "unknown preset": (["--methods", "ste", "--preset", "nosuch"], "valid presets:"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_gives_one_line_exit_2_and_no_record(case, dirs, capsys):
    argv, message = BAD[case]
    code = main([*argv, "--out", str(dirs["out"]), "--scratch", str(dirs["scratch"]), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err and message in err
    assert records(dirs["out"]) == []


def test_unreadable_data_root_is_refused(dirs, tmp_path, capsys):
    code = main(["--methods", "ste", "--data-root", str(tmp_path / "absent"), "--out", str(dirs["out"])])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--data-root" in err and "\n" not in err
    assert records(dirs["out"]) == []


def test_corrupt_checkpoint_is_refused_with_the_fix(dirs, capsys):
    argv = ["--methods", "ste", "--steps", "4", *TINY, "--out", str(dirs["out"]), "--scratch", str(dirs["scratch"]),
            "--quiet"]
    spec = build_specs(parser().parse_args(argv))[0]
    checkpoint = Trainer(spec, dirs["out"], dirs["scratch"]).checkpoint_path
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"not a checkpoint")
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "corrupt" in err and f"rm {checkpoint}" in err and "\n" not in err
    assert records(dirs["out"]) == []


def test_exit_code_reaches_the_shell(dirs):
    result = run_cli("--methods", "nosuch", "--out", str(dirs["out"]))
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: unknown method 'nosuch'")


def test_list_names_methods_datasets_models_and_presets(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    for word in ("ste", "ema", "photos", "cifar10", "vqvae", "photos-quick"):
        assert word in out
