"""Kill a run with SIGKILL after its first checkpoint, rerun the same command, compare with an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

from tests.conftest import ROOT, run_cli


def cli_args(method, out, scratch, steps, extra=()):
    return ["--methods", method, "--steps", str(steps), "--ckpt-every", "10", "--eval-every", "10", "--threads", "1",
            "--out", str(out), "--scratch", str(scratch), "--quiet", *extra]


def only_record(out):
    (path,) = list(out.rglob("*.json"))
    return json.loads(path.read_text())


def killed_and_resumed_metrics(method, tmp_path, steps=200, extra=()):
    """-> (metrics of the resumed run, metrics of an uninterrupted run, step at which the first run died)."""
    resumed_out, resumed_scratch = tmp_path / "a" / "results", tmp_path / "a" / "runs"
    args = cli_args(method, resumed_out, resumed_scratch, steps, extra)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "bench.run", *args], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not list(resumed_scratch.rglob("checkpoint.pt")):
        assert process.poll() is None, process.stderr.read().decode()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not list(resumed_out.rglob("*.json")), "the run finished before it could be killed"
    import torch

    (checkpoint,) = list(resumed_scratch.rglob("checkpoint.pt"))
    died_at = torch.load(checkpoint, weights_only=False)["step"]
    assert 0 < died_at < steps

    rerun = run_cli(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert "resume" in rerun.stdout
    uninterrupted = run_cli(*cli_args(method, tmp_path / "b" / "results", tmp_path / "b" / "runs", steps, extra))
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    return only_record(resumed_out)["metrics"], only_record(tmp_path / "b" / "results")["metrics"], died_at
