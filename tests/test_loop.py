import json
import math
import os
import signal

import pytest
import torch
from PIL import Image

from testkit.training import tiny_config
from training import run
from training.checkpoint import checkpoint_path, latest_checkpoint
from training.config import PRESETS, ConfigError
from training.loop import Trainer, ema_decay, lr_at, momentum_at, trim_log

QUIET = dict(sample_every=0, checkpoint_every=0, log_every=0)


@pytest.mark.parametrize("k", [1, 3])
def test_algorithm_1_makes_k_discriminator_updates_per_generator_update(tmp_path, k):
    trainer = Trainer(tiny_config(tmp_path, k=k, steps=4, **QUIET))
    counts = {"d": 0, "g": 0}
    trainer.opt_d.register_step_post_hook(lambda *a: counts.__setitem__("d", counts["d"] + 1))
    trainer.opt_g.register_step_post_hook(lambda *a: counts.__setitem__("g", counts["g"] + 1))
    trainer.train(progress=False)
    assert counts == {"d": 4 * k, "g": 4}
    assert trainer.real_batches == 4 * k  # each D update sees a fresh real minibatch
    # Adam's own per-parameter step counters agree.
    first = next(iter(trainer.opt_d.state.values()))
    assert first["step"].item() == 4 * k


def test_paper_schedules_by_hand():
    cfg = PRESETS["paper-mlp"].config
    assert lr_at(0.1, 0, cfg) == 0.1
    assert lr_at(0.1, 1000, cfg) == pytest.approx(0.1 / 1.000004**1000)
    assert lr_at(0.1, 10**8, cfg) == 1e-6  # floored
    assert momentum_at(0.0, cfg) == 0.5 and momentum_at(1.0, cfg) == 0.5
    assert momentum_at(125.5, cfg) == pytest.approx(0.6)
    assert momentum_at(250.0, cfg) == pytest.approx(0.7) and momentum_at(900.0, cfg) == pytest.approx(0.7)


def test_sgd_groups_follow_the_schedule(tmp_path):
    # 4,500 images in batches of 450: one epoch per 10 D updates; the ramp spans epochs 0.1 to 0.5.
    cfg = PRESETS["paper-mlp"].config.replace(
        out=str(tmp_path), steps=3, k=2, batch_size=450, lr_decay=1.01, momentum_epochs=(0.1, 0.5), **QUIET
    )
    trainer = Trainer(cfg)
    trainer.train(progress=False)
    # The last D update (the 6th) used lr decayed by its 5 predecessors, at epoch 0.6 (ramp finished);
    # the last G update (the 3rd) by its 2 predecessors.
    assert trainer.opt_d.param_groups[0]["lr"] == pytest.approx(0.1 / 1.01**5)
    assert trainer.opt_g.param_groups[0]["lr"] == pytest.approx(0.1 / 1.01**2)
    assert trainer.opt_d.param_groups[0]["momentum"] == pytest.approx(0.7)
    trainer = Trainer(cfg.replace(steps=1, momentum_epochs=(0.0, 1.0)))
    trainer.train(progress=False)
    # G's update came after 2 D updates: epoch 0.2 of a ramp from 0.5 to 0.7 over one epoch.
    assert trainer.opt_g.param_groups[0]["momentum"] == pytest.approx(0.54)


def _tensors(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every tensor that defines the run's future: weights, EMA, optimiser state, RNG."""
    state = trainer.state_dict()
    flat = {}

    def walk(prefix, obj):
        if isinstance(obj, torch.Tensor):
            flat[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}.{i}", v)

    for key in ("G", "D", "G_ema", "opt_g", "opt_d", "rng"):
        walk(key, state[key])
    return flat


RESUME_CASES = {
    "tiny-cdcgan-adam-ema": lambda out: tiny_config(out, **QUIET),
    "tiny-cdcgan-diffaugment-noise": lambda out: tiny_config(out, diffaugment=True, instance_noise=0.1, **QUIET),
    "tiny-cdcgan-translate-mismatch-hinge-sn": lambda out: tiny_config(
        out, diffaugment=True, cutout=False, d_mismatch=0.5, loss="hinge", d_norm="spectral", **QUIET
    ),
    "paper-mlp-sgd-dropout": lambda out: PRESETS["paper-mlp"].config.replace(
        out=str(out), batch_size=16, lr_decay=1.001, momentum_epochs=(0.0, 0.05), conditional=True, **QUIET
    ),
    "ring8-wgan-gp": lambda out: PRESETS["ring8"].config.replace(out=str(out), loss="wgan-gp", k=2, batch_size=32),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_is_bit_identical(tmp_path, case):
    n = 5
    make = RESUME_CASES[case]
    straight = Trainer(make(tmp_path / "straight").replace(steps=2 * n))
    straight.train(progress=False)

    first = Trainer(make(tmp_path / "split").replace(steps=n))
    ckpt = first.train(progress=False)
    assert ckpt == latest_checkpoint(tmp_path / "split")
    del first
    torch.manual_seed(12345)  # whatever happened to the global RNG in between must not matter
    resumed = Trainer.resume(ckpt, steps=2 * n)
    assert resumed.step == n
    resumed.train(progress=False)

    a, b = _tensors(straight), _tensors(resumed)
    assert a.keys() == b.keys() and len(a) > 10
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == []


def test_a_matching_aware_discriminator_learns_to_check_the_label(tmp_path):
    """With d_mismatch, real digits under a wrong label are fakes to D: it learns to score the right label higher.
    Without it, D sees labels only through G's samples, and after 150 steps it does not tell them apart."""
    ranked = {}
    for share in (0.0, 0.5):
        t = Trainer(tiny_config(tmp_path / str(share), d_mismatch=share, steps=150, **QUIET))
        x, labels = t.data.batch(10_000, 256, 1, t.output_range)  # the same real batch for both
        t.train(progress=False)
        t.D.eval()
        with torch.no_grad():
            right = t.D(x, t._labels(labels))
            wrong = t.D(x, t._labels((labels + 1 + torch.arange(len(labels)) % 9) % 10))
        ranked[share] = (right > wrong).float().mean().item()
    assert ranked[0.5] > 0.6 and ranked[0.5] > ranked[0.0] + 0.1


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    runs = [Trainer(tiny_config(tmp_path / str(i), seed=s, steps=3, **QUIET)) for i, s in enumerate((7, 7, 8))]
    for t in runs:
        t.train(progress=False)
    w = [t.G.state_dict()["project.weight"] for t in runs]
    assert torch.equal(w[0], w[1]) and not torch.equal(w[0], w[2])


def test_ema_follows_its_formula_for_weights_and_batchnorm_statistics(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, steps=6, ema=0.9, **QUIET))
    for _ in range(3):
        trainer.iteration()
    before = {k: v.clone() for k, v in trainer.G_ema.state_dict().items()}
    trainer.iteration()  # the 4th generator update
    beta = ema_decay(0.9, 4)
    assert beta == pytest.approx(5 / 14)  # still ramping up towards 0.9
    raw, ema = trainer.G.state_dict(), trainer.G_ema.state_dict()
    for key in ("project.weight", "norms.0.bn.running_mean", "norms.1.bias.weight"):
        assert torch.allclose(ema[key], beta * before[key] + (1 - beta) * raw[key], atol=1e-7), key
    assert torch.equal(ema["norms.0.bn.num_batches_tracked"], raw["norms.0.bn.num_batches_tracked"])
    assert trainer.sampler is trainer.G_ema
    assert ema_decay(0.9, 10_000) == 0.9
    assert Trainer(tiny_config(tmp_path / "no-ema", ema=0.0)).G_ema is None


def test_outputs_metrics_log_grids_and_checkpoints(tiny_run):
    run = tiny_run["run"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    cfg = PRESETS["tiny"].config
    assert [r["step"] for r in records] == list(range(cfg.log_every, cfg.steps + 1, cfg.log_every))
    for r in records:
        assert {"loss_d", "loss_g", "d_real", "d_fake", "images_per_s", "s_per_it"} <= r.keys()
        assert all(math.isfinite(v) for v in r.values())
        assert 0 <= r["d_real"] <= 1 and 0 <= r["d_fake"] <= 1  # nonsat: reported as probabilities
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000010.pt", "step_0000020.pt"]
    grid = Image.open(run / "samples" / "final.png")
    # One row per class (10) and 10 columns of 28px digits upscaled ×2, with 2px padding.
    assert grid.size == (10 * 58 + 2, 10 * 58 + 2)
    assert (run / "samples" / "step_0000010.png").exists()


def test_point_runs_draw_a_scatter_plot(tmp_path):
    trainer = Trainer(PRESETS["ring8"].config.replace(out=str(tmp_path), steps=2, **QUIET))
    trainer.train(progress=False)
    im = Image.open(tmp_path / "samples" / "final.png").convert("RGB")
    assert im.size == (512, 512)
    colours = {c for _, c in im.getcolors(1 << 16)}
    assert (220, 30, 30) in colours and (30, 90, 200) in colours  # modes and samples both drawn


def test_cli_resume_continues_and_refuses_changes_that_would_alter_the_run(tmp_path, capsys):
    base = ["--preset", "tiny", "--out", str(tmp_path), "--no-export", "--no-progress"]
    assert run.main([*base, "--steps", "4"]) == 0
    assert run.main([*base, "--resume", "--steps", "8"]) == 0
    assert "resumed" in capsys.readouterr().err
    assert latest_checkpoint(tmp_path).name == "step_0000008.pt"
    assert run.main([*base, "--resume", "--steps", "12", "--batch-size", "3", "--lr-d", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "batch_size, lr_d: cannot change on resume" in err and "Traceback" not in err
    with pytest.raises(ConfigError, match="seed"):
        Trainer.resume(latest_checkpoint(tmp_path), seed=99)


def test_a_resumed_run_logs_each_step_once(tmp_path):
    """Steps logged after the checkpoint a run resumes from are logged again by the resumed run, once."""
    first = Trainer(tiny_config(tmp_path, steps=3, log_every=1, checkpoint_every=2, sample_every=0))
    first.train(progress=False)
    resumed = Trainer.resume(checkpoint_path(tmp_path, 2), steps=4)
    resumed.train(progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]


def test_trim_log_keeps_records_up_to_the_step_and_drops_a_torn_line(tmp_path):
    log = tmp_path / "metrics.jsonl"
    trim_log(log, 3)  # no log yet: nothing to do
    assert not log.exists()
    log.write_text('{"step": 2}\n{"step": 3}\n{"step": 4}\n{"step": 5, "loss_d": 0.')  # a crash mid-line
    trim_log(log, 3)
    assert log.read_text() == '{"step": 2}\n{"step": 3}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_a_stop_signal_ends_the_run_cleanly_with_a_resumable_checkpoint(tmp_path):
    straight = Trainer(tiny_config(tmp_path / "straight", steps=6, **QUIET))
    straight.train(progress=False)

    stopped = Trainer(tiny_config(tmp_path / "stopped", steps=6, **QUIET))
    # SIGTERM (as Kubernetes sends) arrives in the middle of the 3rd iteration, between D and G updates.
    stopped.opt_d.register_step_post_hook(
        lambda *_: os.kill(os.getpid(), signal.SIGTERM) if stopped.d_updates == 2 else None
    )
    ckpt = stopped.train(progress=False)
    assert stopped.interrupted and stopped.step == 3 and ckpt.name == "step_0000003.pt"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored

    resumed = Trainer.resume(ckpt)
    resumed.train(progress=False)
    assert not resumed.interrupted
    a, b = _tensors(straight), _tensors(resumed)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
