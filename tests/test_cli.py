"""Bad input: one clear line on stderr, exit code 2, no record written, no stray file; and a diverged run, which
is a result, not an error.

Issue 14's twelve cases ("Runs that fail safely"): the BAD table's rows are named by their case (2, 3, 5, 8, 9,
10, 11, 12); 1 is test_a_diverged_run_is_a_record_and_the_grid_goes_on (with 6, the files' modes); 2 and 4 also
test_set_false_is_the_flag_and_duplicates_run_once; 12's warm-up test_a_warm_up_longer_than_the_run_is_said_in_one_line.
tests/test_failures.py holds the faults that need processes or a report: 4 (two processes on one run), 6 (the
umask), 7 (a damaged record stops bench.report), 9 (a resumed run refuses another file list), 10 (Ctrl-C), 12
(checkpoints removed); tests/test_evaluation.py checks that evaluation says what it does (12).
"""
import json
import os

import pytest

from bench.run import build_specs, main, parser
from bench.train import Trainer
from tests.conftest import TINY, run_cli


def records(out):
    return list(out.rglob("*.json")) if out.exists() else []


def strict_json(path):
    """The record, refusing NaN and Infinity (which json.loads would otherwise accept)."""
    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}")
    return json.loads(path.read_text(), parse_constant=refuse)


def cli_args(dirs, *extra):
    return [*TINY, "--out", str(dirs["out"]), "--scratch", str(dirs["scratch"]), "--quiet", "--threads", "1", *extra]


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def image_folder(root, broken: str | None = None, count: int = 40):
    """`count` small PNG images (and one file that is not an image, named `broken`) in root/images."""
    import numpy as np
    from PIL import Image

    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    if broken:
        (folder / broken).write_bytes(b"\x89PNG but not really")
    return folder


def setup_file(name, text=""):
    def make(tmp_path):
        (tmp_path / name).write_text(text)
    return make


# case name -> (argv, a fragment of the one line, a function preparing tmp_path or None); "{tmp}" is tmp_path
BAD = {
    "unknown method": (["--methods", "ste,nosuch"], "valid methods: ", None),
    "unknown dataset": (["--methods", "ste", "--dataset", "mnist9"], "valid datasets: ", None),
    "zero steps": (["--methods", "ste", "--steps", "0"], "--steps must be at least 1", None),
    "negative codebook size": (["--methods", "ste", "--codebook-size", "-3"], "--codebook-size must be at least 1", None),
    "non-integer codebook size": (["--methods", "ste", "--codebook-size", "12.5"], "--codebook-size must be an integer",
                                  None),
    "unknown method option": (["--methods", "ste", "--set", "ste.bogus=1"], "has no option bogus", None),
    "unknown setting": (["--methods", "ste", "--set", "bogus=1"], "unknown setting bogus", None),
    "unknown preset": (["--methods", "ste", "--preset", "nosuch"], "valid presets:", None),
    # issue 14, case 2: a boolean is true/false/1/0, nothing else
    "2 boolean not a boolean": (["--methods", "ste", "--set", "fid=maybe"], "--set fid must be true or false", None),
    # case 3: --out or --scratch unwritable (a file here: the tests run as root, who writes to read-only modes)
    "3 out is a file": (["--methods", "ste", "--out", "{tmp}/file"], "--out {tmp}/file is not a writable folder",
                        setup_file("file")),
    "3 scratch is a file": (["--methods", "ste", "--scratch", "{tmp}/file"],
                            "--scratch {tmp}/file is not a writable folder", setup_file("file")),
    "3 out under a file": (["--methods", "ste", "--out", "{tmp}/file/results"], "is not a writable folder",
                           setup_file("file")),
    # case 5: options of a method that is not in the grid, or not registered at all
    "5 option of a misspelled method": (["--methods", "ste", "--set", "stee.commitment_weight=5"],
                                        "'stee' is not a method of this grid", None),
    "5 preset options of an unknown method": (["--preset", "{tmp}/p.toml"], "unknown method 'stee'",
                                              setup_file("p.toml", 'methods = ["ste"]\n[method_options.stee]\n'
                                                                   "commitment_weight = 5\n")),
    # case 8: the experiment is a folder name
    "8 experiment climbs out": (["--methods", "ste", "--experiment", "../x"], "not a plain folder name", None),
    "8 experiment is a path": (["--methods", "ste", "--experiment", "a/b"], "not a plain folder name", None),
    "8 experiment from a preset": (["--preset", "{tmp}/p.toml"], "not a plain folder name",
                                   setup_file("p.toml", 'methods = ["ste"]\nexperiment = ".."\n')),
    # case 9: an image that cannot be read is found before step 0
    "9 unreadable image": (["--methods", "ste", "--dataset", "imagefolder@32:{tmp}/images"],
                           "1 of 41 image files of imagefolder@32:{tmp}/images are unreadable (first: "
                           "{tmp}/images/041.png", lambda tmp: image_folder(tmp, broken="041.png")),
    # case 10: values that do not parse, a preset that is not TOML
    "10 number not a number": (["--methods", "ste", "--set", "lr=abc"], "--set lr must be a number, got 'abc'", None),
    "10 tuple of the wrong length": (["--methods", "ste", "--set", "betas=0.9"], "--set betas must be 2 comma-separated",
                                     None),
    "10 malformed preset": (["--preset", "{tmp}/p.toml"], "is not valid TOML", setup_file("p.toml", "steps = [\n")),
    # case 11: empty lists
    "11 no seeds": (["--methods", "ste", "--seeds", ","], "--seeds names nothing", None),
    "11 no methods": (["--methods", ","], "--methods names nothing", None),
    # case 12: messages name flags that exist; model options are checked for every model
    "12 eval batch size": (["--methods", "ste", "--eval-batch-size", "0"], "--eval-batch-size must be at least 1", None),
    "12 width": (["--methods", "ste", "--width", "0"], "--width must be at least 1", None),
    "12 vqvae model option": (["--methods", "ste", "--set", "model_options.bogus=1"],
                              "unknown model_options key bogus", None),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_gives_one_line_exit_2_no_record_and_no_stray_file(case, tmp_path, capsys):
    argv, message, prepare = BAD[case]
    if prepare:
        prepare(tmp_path)
    before = files_under(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    out = ["--out", str(tmp_path / "results")] if "--out" not in argv else []
    scratch = ["--scratch", str(tmp_path / "runs")] if "--scratch" not in argv else []
    code = main([*argv, *out, *scratch, "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err and message.replace("{tmp}", str(tmp_path)) in err, err
    assert records(tmp_path) == []
    assert files_under(tmp_path) == before  # nothing written, nothing left behind
    assert not (tmp_path / "results").exists() and not (tmp_path / "runs").exists()


# --- divergence -------------------------------------------------------------------------------------------------

def test_a_diverged_run_is_a_record_and_the_grid_goes_on(dirs):
    """Case 1: lr 1e3 sends ste's loss to NaN within a few steps; the run stops at the next sync, its record says
    where, with no NaN anywhere in the JSON, and fsq, the next method of the grid, runs."""
    result = run_cli("--methods", "ste,fsq", "--set", "fsq.levels=8,4", "--steps", "20", "--lr", "1e3",
                     *cli_args(dirs))
    assert result.returncode == 0, result.stderr
    by_method = {strict_json(p)["spec"]["method"]: strict_json(p) for p in dirs["out"].rglob("*.json")}
    assert set(by_method) == {"ste", "fsq"}
    ste = by_method["ste"]
    assert ste["status"] == "diverged" and "diverged at step" in result.stdout
    divergence = ste["divergence"]
    assert 1 <= divergence["step"] <= divergence["stopped_at_step"] < 20
    assert divergence["last_finite_loss"] is None or divergence["last_finite_loss"] > 0
    assert all(v is None for v in ste["metrics"].values())
    assert set(ste["null_reasons"]) == set(ste["metrics"]) and "diverged" in ste["null_reasons"]["mse"]
    assert by_method["fsq"]["status"] in ("complete", "diverged")
    mode = 0o666 & ~current_umask()
    for path in dirs["out"].rglob("*"):  # case 6: records and samples readable by others (umask 022: 0644)
        if path.is_file():
            assert path.stat().st_mode & 0o777 == mode, path
    assert files_under(dirs["scratch"]) == []  # no checkpoint, lock or temporary left (no --keep-checkpoints)
    again = run_cli("--methods", "ste,fsq", "--set", "fsq.levels=8,4", "--steps", "20", "--lr", "1e3",
                    *cli_args(dirs))
    assert again.returncode == 0 and again.stdout.count("skip (record exists)") == 2  # a result, not a crash


def current_umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_set_false_is_the_flag_and_duplicates_run_once():
    """Cases 2 and 4: `--set fid=false` is `--no-fid` (same value, same run id); `--seeds 0,0` is one run."""
    by_set = build_specs(parser().parse_args(["--methods", "ste", "--set", "fid=false"]))
    by_flag = build_specs(parser().parse_args(["--methods", "ste,ste", "--no-fid", "--seeds", "0,0"]))
    assert len(by_flag) == 1 and by_set[0].fid is False and by_set[0].run_id() == by_flag[0].run_id()


def test_a_warm_up_longer_than_the_run_is_said_in_one_line(dirs, capsys):
    """Case 12: legal, probably not meant: one warning line, and the run goes on."""
    code = main(["--methods", "ste", "--steps", "2", *TINY, "--warmup-steps", "5", "--out", str(dirs["out"]),
                 "--scratch", str(dirs["scratch"]), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 0 and err == ("warning: --warmup-steps 5 is not below --steps 2: the learning rate rises for the "
                                 "whole run and never reaches --lr; pass a smaller --warmup-steps")
    assert len(records(dirs["out"])) == 1


def test_unreadable_data_root_is_refused(dirs, tmp_path, capsys):
    code = main(["--methods", "ste", "--data-root", str(tmp_path / "absent"), "--out", str(dirs["out"]),
                 "--scratch", str(dirs["scratch"])])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--data-root" in err and "\n" not in err
    assert records(dirs["out"]) == [] and not dirs["out"].exists()


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
    assert files_under(dirs["scratch"]) == [str(checkpoint.relative_to(dirs["scratch"]))]  # no lock left behind


def test_exit_code_reaches_the_shell(dirs):
    result = run_cli("--methods", "nosuch", "--out", str(dirs["out"]))
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: unknown method 'nosuch'")


def test_list_names_methods_datasets_models_and_presets(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    for word in ("ste", "ema", "photos", "cifar10", "vqvae", "photos-quick"):
        assert word in out
