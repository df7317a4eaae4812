"""Data parallelism (issue 15): a 2-rank gloo run on the CPU is the one-process run.

For every registered method, 5 training steps of a tiny model on a global batch of 8 in one process and on
2 ranks (4 rows each, through the Trainer's own process-group setup from torchrun's environment variables)
leave the same parameters, buffers, optimizer and method state (to 1e-5 relative) and give the same code
indices on a probe batch; and a whole 2-rank run writes a record whose metrics are the one-process record's.
Both ranks run every method inside one spawn (imports and the group's setup are paid once).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from methods import list_methods
from tests.conftest import ROOT, tiny_spec

METHODS = [m for m in list_methods() if not m.startswith("test-")]
BATCH, STEPS, WORLD = 8, 5, 2
RECORD_METHOD = "ema"


# K = 256 (FSQ's smallest listed size), except cvq: its k-means puts 256 codes on the 512 rows of the first batch,
# and among codes that close together the summation order of the averaged gradient (1e-7 relative) flips one
# assignment in 5 steps (seen: one row's usage); with 32 codes its assignments have margins
CODEBOOK_SIZE = {"cvq": 32}
# ibq's default entropy temperature (0.01) saturates the softmax of a tiny untrained model: its entropy terms then
# have no gradient in 5 steps and a rank-local batch entropy went unseen; at 1 they move the parameters
METHOD_OPTIONS = {"ibq": {"entropy_temperature": 1.0}}


def spec_for(method: str, **overrides):
    # steps > STEPS with no validation or checkpoint: train(STEPS) stops mid-run, at the state to compare
    values = dict(method=method, batch_size=BATCH, steps=10, eval_every=0, ckpt_every=0, threads=1,
                  codebook_size=CODEBOOK_SIZE.get(method, 256), method_options=METHOD_OPTIONS.get(method, {}))
    values.update(overrides)
    return tiny_spec(**values)


def flat_state(value, prefix=""):
    """Nested dicts/lists of tensors and numbers -> {path: tensor or value}."""
    out = {}
    if isinstance(value, dict):
        for key, item in value.items():
            out.update(flat_state(item, f"{prefix}/{key}"))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            out.update(flat_state(item, f"{prefix}/{i}"))
    elif isinstance(value, torch.Tensor):
        out[prefix] = value.detach().cpu().clone()
    else:
        out[prefix] = value
    return out


def trained_state(method: str, folder) -> dict:
    """STEPS training steps of `method` through the Trainer (in this process, or this rank): every state a
    checkpoint keeps, and the code indices of a probe batch."""
    from bench.train import Trainer

    trainer = Trainer(spec_for(method), folder / "out", folder / "scratch", progress=False)
    try:
        trainer.setup()
        trainer.train(STEPS)
        state = {"model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
                 "method": trainer.quantizer.training_state(), "model_training": trainer.model.training_state(),
                 "extra_position": trainer.extra_position}
        trainer.model.eval()
        with torch.no_grad():
            probe = trainer.data.test[torch.arange(6)]
            _, out = trainer.model(trainer.model.preprocess(probe))
        state["probe_indices"] = out.indices.cpu()
        return flat_state(state)
    finally:
        trainer.close()


def worker(folder: str) -> None:
    """One rank (its environment set by the parent): every method's state, then a whole run's record."""
    from pathlib import Path

    from bench.train import Trainer

    torch.set_num_threads(1)
    folder = Path(folder)
    rank = int(os.environ["RANK"])
    states = {method: trained_state(method, folder / f"rank{rank}" / method) for method in METHODS}
    torch.save(states, folder / f"states{rank}.pt")
    Trainer(spec_for(RECORD_METHOD, steps=STEPS, eval_every=STEPS), folder / "records", folder / f"scratch{rank}",
            progress=False)()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def differences(distributed: dict, single: dict) -> list[str]:
    """Every entry that differs: integer tensors and plain values exactly, float tensors beyond 1e-5 of the
    tensor's largest magnitude."""
    if distributed.keys() != single.keys():
        return [f"keys differ: {sorted(distributed.keys() ^ single.keys())}"]
    found = []
    for key, expected in single.items():
        got = distributed[key]
        if isinstance(expected, torch.Tensor):
            if got.shape != expected.shape or got.dtype != expected.dtype:
                found.append(f"{key}: {tuple(got.shape)} {got.dtype} != {tuple(expected.shape)} {expected.dtype}")
            elif not expected.is_floating_point():
                if not torch.equal(got, expected):
                    found.append(f"{key}: {(got != expected).sum().item()} of {got.numel()} entries differ")
            elif expected.numel():
                scale = expected.abs().max().item()
                error = (got - expected).abs().max().item()
                if not error <= 1e-5 * max(scale, 1e-6):
                    found.append(f"{key}: max error {error:.3g} at scale {scale:.3g}")
        elif got != expected:
            found.append(f"{key}: {got!r} != {expected!r}")
    return found


def assert_same(distributed: dict, single: dict, what: str) -> None:
    found = differences(distributed, single)
    assert not found, f"{what} {len(found)} entries differ:\n  " + "\n  ".join(found[:12])


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """Both ranks, as torchrun would start them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)."""
    folder = tmp_path_factory.mktemp("ranks")
    port = free_port()
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from tests.test_distributed import worker; worker({str(folder)!r})"
    procs = []
    for rank in range(WORLD):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "VQB_COLLECTIVE_TIMEOUT_S": "120", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=900)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    for rank, proc in enumerate(procs):
        assert proc.returncode == 0, f"rank {rank} failed:\n{outputs[rank][-4000:]}"
    return folder


@pytest.fixture(scope="module")
def rank_states(two_rank_run):
    return [torch.load(two_rank_run / f"states{rank}.pt", weights_only=False) for rank in range(WORLD)]


@pytest.mark.parametrize("method", METHODS)
def test_two_ranks_train_exactly_as_one_process(method, rank_states, tmp_path, one_thread):
    single = trained_state(method, tmp_path)
    for rank, states in enumerate(rank_states):
        assert_same(states[method], single, f"{method} rank {rank} vs one process:")


def test_a_two_rank_record_has_the_one_process_metrics(two_rank_run, tmp_path, one_thread):
    from bench.train import Trainer

    (path,) = (two_rank_run / "records").rglob("*.json")
    distributed = json.loads(path.read_text())
    single_path = Trainer(spec_for(RECORD_METHOD, steps=STEPS, eval_every=STEPS), tmp_path / "records",
                          tmp_path / "scratch", progress=False)()
    single = json.loads(single_path.read_text())
    assert distributed["run_id"] == single["run_id"]  # the world size is no part of what the run is
    assert distributed["env"]["world_size"] == WORLD and distributed["env"]["backend"] == "gloo"
    assert single["env"]["world_size"] == 1 and single["env"]["backend"] is None
    for name in ("mse", "psnr", "ssim", "perplexity", "usage", "dead_codes", "quant_error"):
        assert distributed["metrics"][name] == pytest.approx(single["metrics"][name], rel=1e-5), name
    assert distributed["env"]["code_histogram"] == single["env"]["code_histogram"]
    assert distributed["curves"][-1]["mse"] == pytest.approx(single["curves"][-1]["mse"], rel=1e-5)


def test_a_global_batch_that_does_not_split_over_the_ranks_is_refused_before_anything_starts(monkeypatch, dirs,
                                                                                              capsys):
    from bench.run import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code = main(["--methods", "ste", "--steps", "2", "--batch-size", "33", "--out", str(dirs["out"]),
                 "--scratch", str(dirs["scratch"]), "--quiet"])
    assert code == 2
    assert "--batch-size 33 (the global batch) does not split into 2 equal rank slices" in capsys.readouterr().err
    assert not dirs["out"].exists() or not any(dirs["out"].rglob("*.json"))


def dying_worker(folder: str) -> None:
    """Rank 1 dies before step 3; rank 0 must stop with one line naming itself and the step."""
    from pathlib import Path

    from bench import UserError
    from bench.train import Trainer

    rank = int(os.environ["RANK"])

    class Dying(Trainer):
        def setup(self):
            super().setup()
            if rank == 1:
                before = self.model.before_step

                def die_at_3(step):
                    if step == 3:
                        os._exit(3)
                    before(step)

                self.model.before_step = die_at_3

    try:
        Dying(spec_for("ste", steps=6, eval_every=0, ckpt_every=2), Path(folder) / "out", Path(folder) / "scratch",
              progress=False)()
    except UserError as error:
        print(f"error: {error}")
        sys.exit(2)


def start_ranks(function: str, folder, timeout_s: int) -> list[subprocess.Popen]:
    port = free_port()
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from tests.test_distributed import {function}; "
            f"{function}({str(folder)!r})")
    procs = []
    for rank in range(WORLD):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "VQB_COLLECTIVE_TIMEOUT_S": str(timeout_s), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    return procs


def test_a_rank_that_dies_stops_the_others_with_one_line_within_the_timeout(tmp_path):
    import time

    procs = start_ranks("dying_worker", tmp_path, timeout_s=15)
    started = time.monotonic()
    try:
        out0 = procs[0].communicate(timeout=120)[0]
        procs[1].communicate(timeout=30)
    finally:
        for p in procs:
            p.kill()
    assert procs[1].returncode == 3
    assert procs[0].returncode == 2, out0[-3000:]
    (line,) = [line for line in out0.splitlines() if line.startswith("error:")]
    assert "rank 0 of 2 stopped at step 3 of ste-" in line and "resume from step 2" in line, line
    assert time.monotonic() - started < 100


def test_slurm_jobs_ask_for_one_task_per_gpu_on_every_node():
    from bench.launch import ClusterOptions

    params = ClusterOptions(nodes=2, gpus_per_node=4).submitit_parameters("slurm")
    assert (params["nodes"], params["tasks_per_node"], params["gpus_per_node"]) == (2, 4, 4)
    assert ClusterOptions(nodes=2, gpus_per_node=4).world_size == 8
    single = ClusterOptions().submitit_parameters("slurm")  # unchanged: one task on one node
    assert (single["nodes"], single["tasks_per_node"]) == (1, 1)
    assert ClusterOptions(ranks=2).submitit_parameters("local")["tasks_per_node"] == 2


def test_local_launcher_runs_one_run_on_two_cpu_ranks(dirs):
    from tests.conftest import TINY, run_cli

    result = run_cli("--launcher", "local", "--ranks", "2", "--methods", "ema", "--steps", "4", *TINY,
                     "--batch-size", "8", "--threads", "1", "--out", str(dirs["out"]), "--scratch",
                     str(dirs["scratch"]), "--quiet", timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (path,) = dirs["out"].rglob("*.json")
    record = json.loads(path.read_text())
    assert (record["env"]["world_size"], record["env"]["backend"]) == (2, "gloo")
    refused = run_cli("--launcher", "local", "--ranks", "2", "--methods", "ema", "--steps", "4", *TINY,
                      "--batch-size", "9", "--out", str(dirs["out"]), "--scratch", str(dirs["scratch"]), "--quiet")
    assert refused.returncode == 2 and "does not split into 2 equal rank slices" in refused.stderr


def test_mq_refuses_an_outer_micro_batch_under_several_ranks(monkeypatch):
    from methods import MethodError, collective, create_method

    quantizer = create_method("mq", dim=8, codebook_size=32, outer_micro_batch=4)
    quantizer.setup_training(10)  # one process: fine
    monkeypatch.setattr(collective, "distributed", lambda: True)
    monkeypatch.setattr(collective, "world_size", lambda: 2)
    with pytest.raises(MethodError, match="outer_micro_batch=4 is not supported with 2 data-parallel ranks"):
        quantizer.setup_training(10)
