"""Data parallelism (issue 15): a 2-rank gloo run on the CPU is the one-process run.

For every registered method, 5 training steps of a tiny model on a global batch of 8 in one process and on 2 ranks
(4 rows each, through the Trainer's own process-group setup from torchrun's environment variables) leave the same
parameters, buffers, optimizer and method state (to 1e-5 relative) and give the same code indices on a probe
batch; and whole 2-rank runs (ema; rvq with its (depth, K) histogram and rFID; ibq with a collective in its
forward) write records whose metrics, validation curve, histogram and samples are the one-process record's, while
each rank reconstructs only its slice of the validation and test splits (odd split lengths included). Both ranks
run everything inside one spawn (imports and the group's setup are paid once).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from bench.inception import random_extractor
from methods import list_methods
from tests.conftest import ROOT, tiny_spec

# every registered method at its defaults, and MQ with the VQGAN presets' outer micro-batch (m rows of the global
# batches, each rank evaluating its m / 2 of them; outer_accum 2 takes two micro-batches of one drawn batch, and
# after 5 steps one evaluation waits in the accumulator, which must already be the one-process sum). fd_radius 0.1:
# the finite difference divides float32 rounding by 2 eps, and at 0.01 the two halves' mean and the whole mean
# differed by 1.04e-5 relative in the accumulator
VARIANTS = {"mq@micro": ("mq", {"outer_micro_batch": 4, "outer_every": 1, "outer_accum": 2, "fd_radius": 0.1}),
            "mq-alt@micro": ("mq-alt", {"outer_micro_batch": 4, "outer_every": 1, "outer_accum": 2,
                                        "schedule": "alt"})}
METHODS = [m for m in list_methods() if not m.startswith("test-")] + list(VARIANTS)
BATCH, STEPS, WORLD = 8, 5, 2
# whole runs to a record, each validated once (at its last step) and evaluated on the test split:
# method -> (spec overrides, validation images kept, test images kept; None: the whole split, photos' 504 and 961).
# After 5 steps the tiny single-codebook models put every position on one code (identical reconstructions); rvq's
# levels do not, so its record is the one whose rFID, KID and samples tell the images apart
RECORDS = {
    # validation 504 (even), test 961 (odd: slices of 480 and 481), one batch per slice
    "ema": (dict(), None, None),
    # (code_depth, K) histogram, rFID and KID through the random Inception, validation 503 (odd), test 201 (slices
    # of 100 and 101), two evaluation batches per slice (64 and 36 or 37)
    "rvq": (dict(fid=True, eval_batch_size=64), 503, 201),
    # a forward with a collective in training (its batch entropy), also run in eval mode: the test slices of 100
    # and 101 take one and two batches
    "ibq": (dict(eval_batch_size=100), None, 201),
}
GATHER_ROWS = 7  # the workers gather reconstructions in rounds of 7 rows: several uneven rounds per slice


# K = 256 (FSQ's smallest listed size), except cvq: its k-means puts 256 codes on the 512 rows of the first batch,
# and among codes that close together the summation order of the averaged gradient (1e-7 relative) flips one
# assignment in 5 steps (seen: one row's usage); with 32 codes its assignments have margins
CODEBOOK_SIZE = {"cvq": 32}
# ibq's default entropy temperature (0.01) saturates the softmax of a tiny untrained model: its entropy terms then
# have no gradient in 5 steps and a rank-local batch entropy went unseen; at 1 they move the parameters
METHOD_OPTIONS = {"ibq": {"entropy_temperature": 1.0}}


def spec_for(method: str, **overrides):
    # steps > STEPS with no validation or checkpoint: train(STEPS) stops mid-run, at the state to compare
    method, options = VARIANTS.get(method, (method, METHOD_OPTIONS.get(method, {})))
    values = dict(method=method, batch_size=BATCH, steps=10, eval_every=0, ckpt_every=0, threads=1,
                  codebook_size=CODEBOOK_SIZE.get(method, 256), method_options=options)
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


def record_spec(method: str):
    return spec_for(method, steps=STEPS, eval_every=STEPS, **RECORDS[method][0])


def counting_trainer(method: str, out, scratch):
    """A Trainer of RECORDS[method] on its trimmed splits that counts, by phase ("val", "test"), the images its
    model reconstructs in eval mode (evaluation), and writes the counts beside the records: seen-RANK.json."""
    from bench.datasets.common import ImageSplits
    from bench.train import Trainer
    from methods import collective

    _, val_size, test_size = RECORDS[method]

    class Counting(Trainer):
        def setup(self):
            super().setup()
            d = self.data
            self.data = ImageSplits(d.name, d.train, d.val[:val_size], d.test[:test_size], d.info)
            self.seen, self.phase = {"val": 0, "test": 0}, None
            self.model.register_forward_pre_hook(self.count)

        def count(self, module, args):
            if not module.training:
                self.seen[self.phase] += len(args[0])  # phase None: an evaluation outside these two, a KeyError

        def validate(self):
            self.phase = "val"
            try:
                return super().validate()
            finally:
                self.phase = None

        def finish(self):
            self.phase = "test"
            path = super().finish()
            (path.parent / f"seen-{collective.rank()}.json").write_text(json.dumps(self.seen))
            return path

    return Counting(record_spec(method), out, scratch, progress=False)


def random_inception():
    """The FID Inception replaced by the random-weight one (bench.inception.random_extractor), as
    tests/test_evaluation.py does: fast, and the same network in every process."""
    import bench.evaluation
    from bench.inception import random_extractor

    bench.evaluation.fid_extractor = lambda spec, device: (random_extractor(seed=0), None)


def worker(folder: str) -> None:
    """One rank (its environment set by the parent): every method's state, then whole runs' records, then the
    gather of uneven slices by itself."""
    from pathlib import Path

    from methods import collective

    torch.set_num_threads(1)
    folder = Path(folder)
    rank = int(os.environ["RANK"])
    states = {method: trained_state(method, folder / f"rank{rank}" / method) for method in METHODS}
    torch.save(states, folder / f"states{rank}.pt")
    random_inception()
    collective.GATHER_CHUNK_BYTES = GATHER_ROWS * 3 * 32 * 32  # rows of 3x32x32 uint8
    for method in RECORDS:
        counting_trainer(method, folder / "records" / method, folder / f"scratch{rank}")()
    gathered = {}
    for n in (0, 1, 5):  # slices [0, 0], [0, 1] (rank 0 empty), [2, 3]
        rows = collective.shard(n)
        mine = torch.arange(rows.start, rows.stop).repeat_interleave(6).view(-1, 2, 3)
        got = collective.gather_rows_to_main(mine, collective.shard_sizes(n))
        gathered[n] = {"sizes": collective.shard_sizes(n), "rows": [rows.start, rows.stop],
                       "gathered": None if got is None else got.tolist()}
    (folder / f"gathered{rank}.json").write_text(json.dumps(gathered))


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
               # rank 0's rFID and KID, alone, took over 120 s on a loaded 2-core machine
               "VQB_COLLECTIVE_TIMEOUT_S": "600", "OMP_NUM_THREADS": "1",
               # FID reference features cached here; no VGG16 here, so LPIPS is null in both records
               "VQBENCH_CACHE": str(folder / "cache"), "TORCH_HOME": str(folder / "torch")}
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
    failed = [rank for rank, proc in enumerate(procs) if proc.returncode != 0]
    assert not failed, "\n".join(f"rank {rank} failed (exit {procs[rank].returncode}):\n{outputs[rank][-4000:]}"
                                  for rank in failed)
    return folder


@pytest.fixture(scope="module")
def rank_states(two_rank_run):
    return [torch.load(two_rank_run / f"states{rank}.pt", weights_only=False) for rank in range(WORLD)]


@pytest.mark.parametrize("method", METHODS)
def test_two_ranks_train_exactly_as_one_process(method, rank_states, tmp_path, one_thread):
    single = trained_state(method, tmp_path)
    for rank, states in enumerate(rank_states):
        assert_same(states[method], single, f"{method} rank {rank} vs one process:")


def sizes_of_slices(n: int) -> list[int]:
    """The ranks' slices of n rows as sharded evaluation cuts them: contiguous, later ranks one larger."""
    return [(r + 1) * n // WORLD - r * n // WORLD for r in range(WORLD)]


@pytest.mark.parametrize("method", RECORDS)
def test_a_two_rank_record_has_the_one_process_metrics_each_rank_evaluating_its_slice(
        method, two_rank_run, tmp_path, monkeypatch, one_thread):
    import numpy as np

    monkeypatch.setenv("VQBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr("bench.evaluation.fid_extractor", lambda spec, device: (random_extractor(seed=0), None))
    folder = two_rank_run / "records" / method
    (path,) = folder.rglob(f"{method}-*.json")
    distributed = json.loads(path.read_text())
    trainer = counting_trainer(method, tmp_path / "records", tmp_path / "scratch")
    single_path = trainer()
    single = json.loads(single_path.read_text())
    assert distributed["run_id"] == single["run_id"]  # the world size is no part of what the run is
    assert distributed["env"]["world_size"] == WORLD and distributed["env"]["backend"] == "gloo"
    assert single["env"]["world_size"] == 1 and single["env"]["backend"] is None

    # each rank reconstructed its slice of each split, once; one process, all of it
    seen_single = json.loads((single_path.parent / "seen-0.json").read_text())
    val_size, test_size = seen_single["val"], single["env"]["test_images"]  # one validation: eval_every = steps
    assert (val_size, test_size) == (RECORDS[method][1] or 504, RECORDS[method][2] or 961)
    assert seen_single["test"] == test_size
    seen = [json.loads((path.parent / f"seen-{rank}.json").read_text()) for rank in range(WORLD)]
    assert [s["val"] for s in seen] == sizes_of_slices(val_size), seen
    assert [s["test"] for s in seen] == sizes_of_slices(test_size), seen

    # every metric of the record (per-level ones included), None where the one-process record has None
    metrics, expected = distributed["metrics"], single["metrics"]
    assert metrics.keys() == expected.keys()
    for name, value in expected.items():
        if value is None:
            assert metrics[name] is None, name
        else:
            assert metrics[name] == pytest.approx(value, rel=1e-5), name
    for name in ("mse", "psnr", "ssim", "perplexity", "usage", "dead_codes", "quant_error"):
        assert expected[name] is not None, name
    if method == "rvq":
        assert distributed["env"]["code_depth"] == 4 and "perplexity_level_3" in expected
    if single["spec"]["fid"]:
        assert expected["rfid"] is not None and expected["kid"] is not None
        assert distributed["env"]["fid_images"] == single["env"]["fid_images"] == test_size
    assert distributed["env"]["code_histogram"] == single["env"]["code_histogram"]
    assert distributed["null_reasons"] == single["null_reasons"]
    assert len(distributed["curves"]) == len(single["curves"]) == 1
    for name in ("mse", "perplexity", "usage"):
        assert distributed["curves"][-1][name] == pytest.approx(single["curves"][-1][name], rel=1e-5), name
    # the samples come from rank 0's gathered reconstructions: the same images, in split order
    with np.load(path.with_suffix(".samples.npz")) as got, np.load(single_path.with_suffix(".samples.npz")) as want:
        for key in ("original", "reconstruction"):
            assert np.array_equal(got[key], want[key]), key
        if method == "rvq":  # reconstructions that differ: a gather out of order would show
            assert len({r.tobytes() for r in want["reconstruction"]}) == len(want["reconstruction"])


def test_uneven_slices_gather_to_rank_0_in_order(two_rank_run):
    ranks = [json.loads((two_rank_run / f"gathered{rank}.json").read_text()) for rank in range(WORLD)]
    for n in ("0", "1", "5"):
        sizes = sizes_of_slices(int(n))
        assert ranks[0][n]["sizes"] == ranks[1][n]["sizes"] == sizes
        assert ranks[0][n]["rows"] == [0, sizes[0]] and ranks[1][n]["rows"] == [sizes[0], int(n)]
        assert ranks[0][n]["gathered"] == torch.arange(int(n)).repeat_interleave(6).view(-1, 2, 3).tolist()
        assert ranks[1][n]["gathered"] is None


def test_sharded_evaluation_in_one_process_is_the_whole_split_without_collectives(monkeypatch, one_thread):
    """At world size 1 `sharded` changes nothing: the same numbers and reconstructions, and no collective."""
    from bench.datasets import load_dataset
    from bench.metrics import evaluate_split
    from bench.models import build_model

    def no_collective(*args, **kwargs):
        raise AssertionError("a collective in one process")

    for name in ("all_reduce", "all_gather", "gather", "broadcast"):
        monkeypatch.setattr(torch.distributed, name, no_collective)
    torch.manual_seed(0)
    spec = spec_for("rvq")
    model = build_model(spec)
    images = load_dataset("photos", None, False).val[:37]
    runs = [evaluate_split(model, images, spec.codebook_size, 16, keep_reconstructions=True, ssim=True,
                           sharded=sharded) for sharded in (False, True)]
    assert runs[0].metrics == runs[1].metrics
    assert torch.equal(runs[0].histogram, runs[1].histogram) and runs[0].histogram.shape == (4, spec.codebook_size)
    assert torch.equal(runs[0].reconstructions, runs[1].reconstructions) and len(runs[0].reconstructions) == 37


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


def test_mq_refuses_an_outer_micro_batch_that_does_not_split_over_the_ranks(monkeypatch):
    from methods import MethodError, collective, create_method

    quantizer = create_method("mq", dim=8, codebook_size=32, outer_micro_batch=6)
    monkeypatch.setattr(collective, "distributed", lambda: True)
    monkeypatch.setattr(collective, "world_size", lambda: 2)
    quantizer.setup_training(10)  # 6 rows: 3 per rank
    monkeypatch.setattr(collective, "world_size", lambda: 4)
    with pytest.raises(MethodError, match="outer_micro_batch=6 does not split into 4 equal rank slices"):
        quantizer.setup_training(10)
