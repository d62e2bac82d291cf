"""Domain feature extractors: small classifiers trained on a dataset's train split.

Offline FID/KID/precision-recall need features from a network that knows the domain (gan-facts.md: no
Inception weights here). Its penultimate layer gives the features, its softmax the classifier Inception Score
and the label accuracy of conditional generators. Scores are comparable only under the same weights, so the
file's sha256 and held-out accuracy are published with them.

Two architectures, so that a score which only one network likes shows up as such: `cnn4` (four 3×3 convs with
BatchNorm, 128-d ReLU features) and `lenet` (two 5×5 convs without normalisation, 84-d linear features). The two
bundled mnist5k extractors were made by

    python -m training.classifier --arch cnn4 --seed 0 --epochs 40 --out training/assets/mnist5k-classifier.pt
    python -m training.classifier --arch lenet --seed 1 --epochs 30 --out training/assets/mnist5k-lenet.pt
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from training import data as data_mod
from training.config import ConfigError, TrainConfig
from training.data import DataError, sha256_file

BUNDLED = Path(__file__).parent / "assets" / "mnist5k-classifier.pt"
BUNDLED_SHA256 = "2d4851a5289a2400b4f76a1936a0543fe418dd58649d2d3f8b3bae8240efaab7"  # held-out accuracy 0.984
# The second, independent mnist5k extractor (another architecture and seed); evaluate reports both.
BUNDLED_SECOND = Path(__file__).parent / "assets" / "mnist5k-lenet.pt"
BUNDLED_SECOND_SHA256 = "f9d75ef4dc00ee8275be4af5284169ddf39c8406ac87c1d68bcbb81a6422afc9"  # held-out accuracy 0.982
FEATURES = 128
LENET_FEATURES = 84
# Training augmentation, per image: small random affine warps (MNIST's usual ±10°, ±10% scale, ±2 px)
ROTATE, SCALE, SHIFT = 10.0, 0.1, 2.0


class Classifier(nn.Module):
    """`cnn4`: two conv blocks and a 128-d feature layer; inputs are pixels in [0, 1], [B, C, H, W]."""

    def __init__(self, channels: int, size: int, num_classes: int):
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.conv = nn.Sequential(
            *block(channels, 32), *block(32, 32), nn.MaxPool2d(2), *block(32, 64), *block(64, 64), nn.MaxPool2d(2)
        )
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(64 * (size // 4) ** 2, FEATURES), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(FEATURES, num_classes))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [B, 128], logits [B, classes])."""
        f = self.features(self.conv(x))
        return f, self.head(f)


class LeNet(nn.Module):
    """`lenet`: LeNet-5's layout at Caffe's widths (5×5 convs, 20 and 50 maps, max-pooling, no normalisation) and
    LeNet-5's 84-unit tanh layer, whose pre-activations are the features (the saturated tanh outputs hardly
    see blur); inputs are pixels in [0, 1], [B, C, H, W]."""

    def __init__(self, channels: int, size: int, num_classes: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(channels, 20, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        side = (size // 2 - 4) // 2
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(50 * side * side, LENET_FEATURES))
        self.head = nn.Sequential(nn.Tanh(), nn.Dropout(0.3), nn.Linear(LENET_FEATURES, num_classes))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [B, 84], logits [B, classes])."""
        f = self.features(self.conv(x))
        return f, self.head(f)


ARCHITECTURES: dict[str, type[nn.Module]] = {"cnn4": Classifier, "lenet": LeNet}


def _pixels(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255.0


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random rotation, scale and translation per image (bilinear, zero fill)."""
    n, size = len(x), x.shape[-1]
    u = lambda: torch.rand(n, generator=g) * 2 - 1  # noqa: E731
    angle, scale = u() * (ROTATE * torch.pi / 180), 1 + u() * SCALE
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    shift = torch.stack([u(), u()], 1) * (2 * SHIFT / size)  # affine_grid works in [-1, 1] coordinates
    theta = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
    theta = torch.cat([theta, shift[:, :, None]], 2)
    return F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)


@torch.no_grad()
def run(model: nn.Module, pixels: np.ndarray | torch.Tensor, batch: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Features [N, F] and class probabilities [N, classes] for pixels in [0, 1]."""
    model.eval()
    x = torch.as_tensor(pixels, dtype=torch.float32)
    feats, probs = [], []
    for i in range(0, len(x), batch):
        f, logits = model(x[i : i + batch])
        feats.append(f.numpy())
        probs.append(logits.softmax(1).numpy())
    return np.concatenate(feats).astype(np.float64), np.concatenate(probs).astype(np.float64)


def fit(
    arch: str, x: torch.Tensor, y: torch.Tensor, num_classes: int, epochs: int, seed: int = 0, progress: bool = True
) -> nn.Module:
    """Train one classifier of `arch` on pixels x [N, C, H, W] in [0, 1] and labels y [N], with the augmentation
    and one-cycle schedule every extractor here uses; the classification accuracy score trains it on samples."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = ARCHITECTURES[arch](x.shape[1], x.shape[-1], num_classes)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * (len(x) // 64))
    for _ in tqdm(range(epochs), desc=f"{arch} classifier", unit="epoch", disable=not progress):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(perm) - 63, 64):
            idx = perm[i : i + 64]
            _, logits = model(_augment(x[idx], g))
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def train(
    cfg: TrainConfig, epochs: int, seed: int = 0, progress: bool = True, arch: str = "cnn4"
) -> tuple[nn.Module, dict[str, Any]]:
    """Train on cfg's train split; held-out accuracy on its test split (every 10th image for `folder`)."""
    train_data = data_mod.load(cfg.replace(split="train", conditional=True))
    if cfg.dataset == "folder":
        held = torch.arange(train_data.size) % 10 == 0
        x_test, y_test = train_data.images[held], train_data.labels[held]
        x_train, y_train = train_data.images[~held], train_data.labels[~held]
    else:
        test_data = data_mod.load(cfg.replace(split="test", conditional=True))
        x_train, y_train, x_test, y_test = train_data.images, train_data.labels, test_data.images, test_data.labels
    model = fit(arch, _pixels(x_train), y_train, len(train_data.class_names), epochs, seed, progress)
    _, probs = run(model, _pixels(x_test))
    info = {
        "arch": arch,
        "dataset": cfg.dataset,
        "image_shape": [cfg.channels, cfg.image_size, cfg.image_size],
        "class_names": list(train_data.class_names),
        "held_out_accuracy": float((probs.argmax(1) == y_test.numpy()).mean()),
        "held_out_images": len(y_test),
        "epochs": epochs,
        "seed": seed,
    }
    return model, info


def save(model: nn.Module, info: dict[str, Any], path: Path) -> str:
    """Writes {state, info} atomically; returns the file's sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"state": model.state_dict(), "info": info}, tmp)
    tmp.replace(path)
    return sha256_file(path)


class ClassifierError(Exception):
    """A classifier file that is missing, corrupt or from another architecture."""


def load(path: Path) -> tuple[nn.Module, dict[str, Any], str]:
    """(model, info, sha256); weights_only, so a classifier file cannot run code."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        info = blob["info"]
        c, h, _ = info["image_shape"]
        info = {"arch": "cnn4"} | info  # files from before `lenet` existed do not say
        arch = info["arch"]
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {arch!r}")
        model = ARCHITECTURES[arch](c, h, len(info["class_names"]))
        model.load_state_dict(blob["state"])
    except (OSError, RuntimeError, KeyError, TypeError, ValueError, pickle.UnpicklingError) as e:
        raise ClassifierError(f"classifier: cannot load {path}: {str(e).splitlines()[0]}") from None
    return model.eval(), info, sha256_file(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.classifier", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=sorted(ARCHITECTURES), default="cnn4")
    p.add_argument("--dataset", default="mnist5k")
    p.add_argument("--data-dir", default="")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    try:
        cfg = TrainConfig(
            dataset=args.dataset, data_dir=args.data_dir, image_size=args.image_size, channels=args.channels
        )
        if cfg.dataset in ("ring8", "grid25"):
            raise ConfigError("dataset: 2-D mixtures are scored by mode coverage, not by a classifier")
        if cfg.image_size % 4 or cfg.image_size < 12:
            raise ConfigError(f"image_size: must be a multiple of 4, at least 12 (got {cfg.image_size})")
        model, info = train(cfg, args.epochs, args.seed, arch=args.arch)
        digest = save(model, info, args.out)
    except (ConfigError, DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    accuracy = f"held-out accuracy {info['held_out_accuracy']:.4f} on {info['held_out_images']} images"
    print(f"{args.out} ({args.arch}): {accuracy}")
    print(f"sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
