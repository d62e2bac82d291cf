"""Data-parallel training: two CPU processes under torchrun (gloo), as users launch it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DistributedSampler

from testkit.training import tiny_config
from training import data, run
from training.checkpoint import latest_checkpoint, load_checkpoint
from training.config import TrainConfig
from training.data import STREAM_DATA, stream_seed
from training.dist import Dist, state_digest
from training.loop import Trainer

ROOT = Path(__file__).resolve().parent.parent
WORLD = 2
REPLICA = ("G", "D", "G_ema", "opt_g", "opt_d")


def torchrun(out: Path, *args: str) -> subprocess.Popen:
    """`torchrun --standalone --nproc_per_node=2 -m training.run --preset tiny ...` (gloo, one thread each)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}"]
    cmd += ["-m", "training.run", "--preset", "tiny", "--out", str(out), "--no-export", "--no-progress"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # gloo even where CUDA exists
    return subprocess.Popen(
        [*cmd, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )


def worker(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker with RANK=`rank` (Linux /proc)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except OSError:
            continue  # exited meanwhile
        if int(fields[1]) == launcher.pid and f"RANK={rank}".encode() in environ:
            return int(stat.parent.name)
    raise LookupError(f"no worker with RANK={rank}")


def finish(launcher: subprocess.Popen, timeout: float = 120) -> str:
    try:
        out, _ = launcher.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)  # the workers too: hung ranks would outlive torchrun
        raise
    return out.decode(errors="replace")


def step_of(path: Path) -> int:
    return int(path.stem.split("_")[1])


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> dict:
    """A 2-process run stopped by SIGTERM to rank 1 alone, and the same run resumed from an earlier checkpoint."""
    # Up to the stop, the stopped run is an uninterrupted one: its last checkpoint is the reference.
    if not sys.platform.startswith("linux"):
        pytest.skip("finds torchrun's workers through /proc")
    root = tmp_path_factory.mktemp("ddp")
    stopped = torchrun(root / "stopped", "--steps", "100000", "--checkpoint-every", "3", "--log-every", "1")
    log = root / "stopped" / "metrics.jsonl"
    deadline = time.monotonic() + 90
    while not (log.exists() and len(log.read_text().splitlines()) >= 5):  # past the checkpoint at step 3
        if stopped.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the run did not get going:\n{finish(stopped)}")
        time.sleep(0.05)
    os.kill(worker(stopped, 1), signal.SIGTERM)
    stopped_out = finish(stopped)
    last = latest_checkpoint(root / "stopped")
    resumed = torchrun(
        root / "resumed", "--resume", str(root / "stopped" / "checkpoints" / "step_0000003.pt"),
        "--steps", str(step_of(last)), "--checkpoint-every", "0", "--log-every", "2",
    )  # fmt: skip
    resumed_out = finish(resumed)
    assert resumed.returncode == 0, resumed_out
    return {
        "root": root,
        "stopped": stopped_out,
        "stopped_rc": stopped.returncode,
        "resumed": resumed_out,
        "last": last,
    }


def test_a_stop_signal_to_one_rank_stops_every_rank_at_the_same_step_with_a_checkpoint(ddp):
    s = step_of(ddp["last"])
    assert s >= 5 and ddp["stopped_rc"] != 0  # torchrun reports the workers' status 130 as a failure
    # Rank 0 was never signalled, yet it stopped at rank 1's iteration (else: a hang), and both ranks
    # took part in writing that checkpoint.
    ck = load_checkpoint(ddp["last"])
    assert ck["counters"]["step"] == s and len(ck["replica_sha256"]) == WORLD
    assert not re.search(r'File ".*training/\w+\.py"', ddp["stopped"]), ddp["stopped"]  # no worker crashed


def test_replicas_are_identical_on_every_rank_and_ranks_draw_their_own_noise(ddp):
    checkpoints = sorted((ddp["root"] / "stopped" / "checkpoints").glob("*.pt"))
    assert len(checkpoints) >= 2
    for path in [*checkpoints, latest_checkpoint(ddp["root"] / "resumed")]:
        ck = load_checkpoint(path)
        assert ck["world_size"] == WORLD
        # Each rank hashed its own G, D, EMA and optimiser states; rank 0's file hashes the same.
        assert ck["replica_sha256"] == [state_digest(ck[k] for k in REPLICA)] * WORLD, path
        r0, r1 = ck["rng_ranks"]
        assert all(torch.equal(r0[k], ck["rng"][k]) for k in r0)
        assert not torch.equal(r0["noise"], r1["noise"]) and not torch.equal(r0["torch"], r1["torch"])


def test_a_resumed_run_is_bit_identical_to_the_uninterrupted_one(ddp):
    straight, resumed = load_checkpoint(ddp["last"]), load_checkpoint(latest_checkpoint(ddp["root"] / "resumed"))
    assert "resumed" in ddp["resumed"] and resumed["counters"] == straight["counters"]
    for key in (*REPLICA, "rng_ranks"):
        assert state_digest([resumed[key]]) == state_digest([straight[key]]), key


def test_the_gradient_penalty_and_diffaugment_keep_replicas_identical(tmp_path):
    # WGAN-GP differentiates D's gradient through the DDP wrapper (autograd.grad with create_graph).
    args = ("--steps", "3", "--loss", "wgan-gp", "--d-norm", "none", "--diffaugment")
    out = finish(torchrun(tmp_path, *args))
    ck = load_checkpoint(latest_checkpoint(tmp_path))
    assert ck["counters"]["step"] == 3, out
    assert ck["replica_sha256"] == [state_digest(ck[k] for k in REPLICA)] * WORLD


def test_rank_0_alone_writes_the_log_and_the_grid(ddp):
    records = [json.loads(line) for line in (ddp["root"] / "resumed" / "metrics.jsonl").read_text().splitlines()]
    s = step_of(ddp["last"])
    assert [r["step"] for r in records] == list(range(4, s + 1, 2)) + ([s] if s % 2 else [])  # from step 3
    assert (ddp["root"] / "resumed" / "samples" / "final.png").exists()


def test_resuming_with_another_number_of_processes_is_refused(ddp, capsys):
    ckpt = ddp["last"]
    argv = ["--preset", "tiny", "--out", str(ddp["root"] / "single"), "--no-export", "--no-progress"]
    assert run.main([*argv, "--resume", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "world_size: the checkpoint was written by 2 process(es) and this run has 1" in err
    assert "Traceback" not in err


def test_each_rank_takes_the_share_distributed_sampler_would_give_it():
    d = data.load(TrainConfig(dataset="mnist5k"))
    batch, world, seed = 100, 4, 3
    per_epoch = d.size // batch
    for epoch in (0, 1):
        # DistributedSampler(drop_last=True) splits an epoch's order rank-strided; the order itself is the
        # run's own per-epoch permutation (what set_epoch reshuffles).
        order = torch.randperm(d.size, generator=torch.Generator().manual_seed(stream_seed(seed, STREAM_DATA, epoch)))
        for rank in range(world):
            sampler = DistributedSampler(range(d.size), world, rank, shuffle=False, drop_last=True)
            mine = order[list(sampler)]
            for i in (0, per_epoch - 1):
                counter = epoch * per_epoch + i
                _, labels = d.batch(counter, batch, seed, (0, 1), rank, world)
                want = mine[i * batch // world : (i + 1) * batch // world]
                assert torch.equal(labels, d.labels[want])
    # The shares partition the global batch, which does not depend on the number of processes.
    full = d.batch(7, batch, seed, (-1, 1))[0]
    shares = [d.batch(7, batch, seed, (-1, 1), r, world)[0] for r in range(world)]
    assert torch.equal(torch.stack(shares, 1).flatten(0, 1), full)
    ring = data.ring8()
    assert torch.equal(ring.batch(3, 8, seed)[0][1::2], ring.batch(3, 8, seed, rank=1, world=2)[0])


def test_the_global_batch_must_split_evenly_over_the_processes():
    cfg = TrainConfig(batch_size=64)
    assert cfg.batch_per_rank(1) == 64 and cfg.batch_per_rank(4) == 16
    with pytest.raises(ValueError, match=r"batch_size: the global batch \(64\) must split evenly over the 3"):
        cfg.batch_per_rank(3)


def test_without_torchrun_there_is_no_process_group_and_collectives_are_identities(tmp_path):
    d = Dist()
    assert d.is_main and not d.group and d.any(True) and not d.any(False)
    assert d.mean({"a": 1.5}) == {"a": 1.5} and d.gather(3) == [3]
    trainer = Trainer(tiny_config(tmp_path, steps=1))
    assert trainer.G_ddp is trainer.G and trainer.D_ddp is trainer.D and trainer.rank_batch == 16
    assert "rng_ranks" not in trainer.state_dict() and trainer.state_dict()["world_size"] == 1
