import subprocess
import sys

import pytest

from training import run
from training.config import PRESETS, ConfigError, TrainConfig


def test_presets_are_valid_and_include_the_required_ones():
    assert {"paper-mlp", "mnist-dcgan", "mnist-cdcgan", "ring8", "grid25", "tiny"} <= set(PRESETS)
    assert PRESETS["mnist-cdcgan"].config.conditional


def test_paper_preset_matches_the_released_configuration():
    cfg = PRESETS["paper-mlp"].config
    assert (cfg.arch, cfg.prior, cfg.loss, cfg.optimizer, cfg.k) == ("mlp", "uniform", "nonsat", "sgd", 1)
    assert (cfg.batch_size, cfg.lr_d, cfg.lr_decay, cfg.lr_floor) == (100, 0.1, 1.000004, 1e-6)
    assert cfg.momentum == (0.5, 0.7) and cfg.momentum_epochs == (1.0, 250.0)
    assert cfg.dataset == "mnist5k" and cfg.latent_dim == 100


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"dataset": "imagenet"}, "dataset"),
        ({"loss": "wgan-gp"}, "d_norm"),  # a BatchNorm critic under a gradient penalty
        ({"image_size": 48}, "image_size"),
        ({"k": 0}, "k"),
        ({"dataset": "folder"}, "data_dir"),
        ({"dataset": "ring8"}, "arch"),
        ({"ema": 1.0}, "ema"),
        ({"betas": (0.5,)}, "betas"),
        ({"momentum_epochs": (5.0,)}, "momentum_epochs"),
        ({"loss": "wgan-gp", "d_norm": "none", "d_mbstd": True}, "d_mbstd"),
        ({"instance_noise": -0.1}, "instance_noise"),
        ({"pack": 2}, "pack"),
        ({"depth": 0}, "depth"),
    ],
)
def test_invalid_configs_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        TrainConfig(**changes)


def test_dict_round_trip_restores_tuples():
    cfg = PRESETS["paper-mlp"].config
    again = TrainConfig.from_dict(cfg.to_dict() | {"betas": [0.1, 0.2]})
    assert again.betas == (0.1, 0.2) and again.momentum == cfg.momentum
    with pytest.raises(ConfigError, match="unknown config fields: bogus"):
        TrainConfig.from_dict({"bogus": 1})


def test_cli_overrides_any_field():
    args = run._parser().parse_args(
        ["--preset", "mnist-cdcgan", "--steps", "3000", "--batch-size", "64", "--out", "runs/x",
         "--betas", "0.0,0.99", "--no-cutout"]
    )  # fmt: skip
    changes = run.overrides(args)
    assert changes == {
        "steps": 3000,
        "batch_size": 64,
        "out": "runs/x",
        "betas": (0.0, 0.99),
        "cutout": False,
    }
    cfg = PRESETS[args.preset].config.replace(**changes)
    assert cfg.steps == 3000 and cfg.loss == PRESETS["mnist-cdcgan"].config.loss


def test_help_lists_every_preset(capsys):
    with pytest.raises(SystemExit) as exit_:
        run.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for name, preset in PRESETS.items():
        assert name in out and preset.summary[:30] in out


def test_bad_input_is_one_clear_line_not_a_traceback(capsys, tmp_path):
    code = run.main(["--preset", "tiny", "--dataset", "folder", "--data-dir", str(tmp_path / "nope"),
                     "--out", str(tmp_path / "run")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "is not a directory" in err and "Traceback" not in err
    assert run.main(["--preset", "tiny", "--loss", "wgan-gp", "--out", str(tmp_path / "r")]) == 2
    assert "d_norm:" in capsys.readouterr().err
    assert run.main(["--preset", "tiny", "--resume", str(tmp_path / "none.pt")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_a_bug_keeps_its_traceback_rather_than_becoming_a_user_error(tmp_path, monkeypatch):
    from training.loop import Trainer

    def bug(self):
        raise ValueError("a programming error")

    monkeypatch.setattr(Trainer, "iteration", bug)
    with pytest.raises(ValueError, match="a programming error"):
        run.main(["--preset", "tiny", "--steps", "1", "--out", str(tmp_path), "--no-export", "--no-progress"])


def test_a_corrupt_image_stops_the_real_command_with_one_line(tmp_path):
    """Through a real process: nothing but one 'error:' line on stderr, exit status 2."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = subprocess.run(
        [sys.executable, "-m", "training.run", "--preset", "tiny", "--dataset", "folder",
         "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1
    assert out.stderr.startswith("error: ") and "broken.png: cannot read image" in out.stderr
