import gzip
import hashlib
import http.server
import io
import pickle
import tarfile
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training import data
from training.config import TrainConfig
from training.data import DataError, Remote


def test_mnist5k_split_is_450_train_50_test_per_class_and_disjoint():
    train = data.load(TrainConfig(dataset="mnist5k", split="train"))
    test = data.load(TrainConfig(dataset="mnist5k", split="test"))
    assert train.images.shape == (4500, 1, 28, 28) and test.images.shape == (500, 1, 28, 28)
    assert train.labels.bincount().tolist() == [450] * 10
    assert test.labels.bincount().tolist() == [50] * 10
    assert train.class_names == tuple("0123456789")
    flat = {bytes(x) for x in train.images.flatten(1).numpy()}
    assert not any(bytes(x) in flat for x in test.images.flatten(1).numpy())
    # Real digits: mostly background with bright strokes.
    assert train.images.float().mean() / 255 == pytest.approx(0.13, abs=0.02)


def test_batches_cover_an_epoch_without_repeats_and_depend_only_on_the_counter():
    d = data.load(TrainConfig(dataset="mnist5k"))
    per_epoch = d.size // 100
    seen = torch.cat([d.batch(i, 100, seed=3, out_range=(0, 1))[1] for i in range(per_epoch)])
    assert seen.bincount().tolist() == [450] * 10  # every image exactly once
    x1, _ = d.batch(7, 100, seed=3, out_range=(-1, 1))
    fresh = data.load(TrainConfig(dataset="mnist5k"))
    x2, _ = fresh.batch(7, 100, seed=3, out_range=(-1, 1))
    assert torch.equal(x1, x2) and x1.min() == -1 and x1.max() == 1
    assert not torch.equal(x1, d.batch(7, 100, seed=4, out_range=(-1, 1))[0])


def test_ring8_has_eight_distinct_modes_on_the_unit_circle():
    ring = data.ring8()
    assert ring.means.shape == (8, 2) and ring.std == 0.01
    assert torch.allclose(ring.means.norm(dim=1), torch.ones(8))
    assert len({tuple(m) for m in ring.means.round(decimals=4).tolist()}) == 8
    x, mode = ring.batch(0, 4000, seed=0)
    assert (x - ring.means[mode]).std().item() == pytest.approx(0.01, rel=0.1)
    assert mode.bincount(minlength=8).min() > 400


def test_grid25_modes_and_std():
    grid = data.grid25()
    assert sorted({v for m in grid.means.tolist() for v in m}) == [-4, -2, 0, 2, 4]
    assert len(grid.means) == 25 and grid.std == 0.05
    x, mode = grid.batch(1, 5000, seed=0)
    assert (x - grid.means[mode]).std().item() == pytest.approx(0.05, rel=0.1)


# --- folders ------------------------------------------------------------------------------------


def _png(path: Path, size: tuple[int, int], color) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_folder_classes_from_subfolders_resized_and_converted(tmp_path):
    _png(tmp_path / "cats" / "a.png", (40, 30), (255, 0, 0))
    _png(tmp_path / "cats" / "b.jpg", (64, 64), (250, 0, 0))
    _png(tmp_path / "dogs" / "c.PNG", (20, 50), (0, 0, 255))
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")
    rgb = data.load(TrainConfig(dataset="folder", data_dir=str(tmp_path), channels=3, conditional=True))
    assert rgb.images.shape == (3, 3, 28, 28)
    assert rgb.class_names == ("cats", "dogs") and rgb.labels.tolist() == [0, 0, 1]
    assert rgb.images[0, 0].float().mean() > 240 and rgb.images[2, 2].float().mean() > 240
    gray = data.load(TrainConfig(dataset="folder", data_dir=str(tmp_path), channels=1, image_size=32))
    assert gray.images.shape == (3, 1, 32, 32)
    assert gray.spec(conditional=False).num_classes == 0


def test_folder_without_subfolders_is_one_unlabelled_set(tmp_path):
    for i in range(3):
        _png(tmp_path / f"{i}.png", (28, 28), (i * 80, 0, 0))
    d = data.load(TrainConfig(dataset="folder", data_dir=str(tmp_path)))
    assert d.images.shape == (3, 1, 28, 28) and d.class_names == ()
    with pytest.raises(DataError, match="no class subfolders"):
        data.load(TrainConfig(dataset="folder", data_dir=str(tmp_path), conditional=True))


def test_folder_errors_are_clear(tmp_path):
    with pytest.raises(DataError, match="is not a directory"):
        data.load(TrainConfig(dataset="folder", data_dir=str(tmp_path / "missing")))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match="no PNG or JPEG images"):
        data.load(TrainConfig(dataset="folder", data_dir=str(tmp_path / "empty")))
    bad = tmp_path / "bad"
    _png(bad / "ok.png", (28, 28), (0, 0, 0))
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match=r"broken\.png: cannot read image"):
        data.load(TrainConfig(dataset="folder", data_dir=str(bad)))


# --- downloads through a loopback HTTP server ---------------------------------------------------


@pytest.fixture
def http_root(tmp_path):
    """Serve tmp_path/www on 127.0.0.1:<free port>; yields (directory, base URL)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def _sha(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _mnist_fixture(www: Path, n_train=12, n_test=5) -> dict[str, str]:
    rng = np.random.default_rng(0)
    blobs = {
        "train-images-idx3-ubyte.gz": _idx(rng.integers(0, 256, (n_train, 28, 28))),
        "train-labels-idx1-ubyte.gz": _idx(np.arange(n_train) % 10),
        "t10k-images-idx3-ubyte.gz": _idx(rng.integers(0, 256, (n_test, 28, 28))),
        "t10k-labels-idx1-ubyte.gz": _idx(np.arange(n_test) % 10),
    }
    for name, blob in blobs.items():
        (www / name).write_bytes(blob)
    return {name: _sha(blob) for name, blob in blobs.items()}


def test_mnist_downloads_verifies_and_caches(http_root, tmp_path, monkeypatch):
    www, url = http_root
    sums = _mnist_fixture(www)
    dead = "http://127.0.0.1:9/"  # discard port: the first mirror fails, the second serves
    monkeypatch.setitem(data.REMOTES, "mnist", Remote((dead, url), sums))
    monkeypatch.setenv("GAN_DATA_CACHE", str(tmp_path / "cache"))
    train = data.load(TrainConfig(dataset="mnist", conditional=True))
    assert train.images.shape == (12, 1, 28, 28) and train.labels[:3].tolist() == [0, 1, 2]
    assert sorted(p.name for p in (tmp_path / "cache" / "mnist").iterdir()) == sorted(sums)
    for f in www.iterdir():  # a second load reads the cache, not the network
        f.unlink()
    test = data.load(TrainConfig(dataset="mnist", split="test"))
    assert test.images.shape == (5, 1, 28, 28)


def test_fashion_mnist_reads_a_data_dir(http_root, tmp_path, monkeypatch):
    www, url = http_root
    sums = _mnist_fixture(www)
    monkeypatch.setitem(data.REMOTES, "fashion-mnist", Remote((url,), sums))
    d = data.load(TrainConfig(dataset="fashion-mnist", data_dir=str(tmp_path / "fm"), conditional=True))
    assert d.class_names[9] == "Ankle boot" and d.images.shape == (12, 1, 28, 28)
    assert (tmp_path / "fm" / "train-images-idx3-ubyte.gz").exists()


def test_checksum_mismatch_is_an_error_and_leaves_nothing_behind(http_root, tmp_path):
    www, url = http_root
    (www / "file.gz").write_bytes(b"tampered")
    remote = Remote((url,), {"file.gz": _sha(b"original")})
    with pytest.raises(DataError, match="checksum mismatch") as err:
        data.fetch(remote, tmp_path / "cache")
    assert _sha(b"original") in str(err.value) and _sha(b"tampered") in str(err.value)
    assert list((tmp_path / "cache").iterdir()) == []
    # A corrupted file already on disk is reported, not silently used.
    (tmp_path / "cache" / "file.gz").write_bytes(b"tampered")
    with pytest.raises(DataError, match="delete it to re-download"):
        data.fetch(remote, tmp_path / "cache")


def test_unreachable_download_names_every_url(tmp_path):
    remote = Remote(("http://127.0.0.1:9/a/", "http://127.0.0.1:9/b/"), {"x.gz": _sha(b"")})
    with pytest.raises(DataError, match=r"could not download x\.gz") as err:
        data.fetch(remote, tmp_path)
    assert "/a/x.gz" in str(err.value) and "/b/x.gz" in str(err.value)


def test_corrupt_idx_is_reported(tmp_path):
    (tmp_path / "x.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="not a gzip file"):
        data.read_idx(tmp_path / "x.gz")
    (tmp_path / "y.gz").write_bytes(gzip.compress(b"\0\0\x08\x01\0\0\0\x05abc"))
    with pytest.raises(DataError, match="holds 3 bytes"):
        data.read_idx(tmp_path / "y.gz")


def test_cifar10_download_and_parse(http_root, tmp_path, monkeypatch):
    www, url = http_root
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:

        def add(name: str, obj) -> None:
            blob = pickle.dumps(obj)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))

        names = [n.encode() for n in ("airplane", "automobile", "bird", "cat", "deer")]
        add("batches.meta", {b"label_names": [*names, b"dog", b"frog", b"horse", b"ship", b"truck"]})
        for i in range(1, 6):
            add(
                f"data_batch_{i}",
                {b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), b"labels": [i, 0]},
            )
        add("test_batch", {b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), b"labels": [1, 2, 3]})
    (www / "cifar-10-python.tar.gz").write_bytes(buf.getvalue())
    monkeypatch.setitem(data.REMOTES, "cifar10", Remote((url,), {"cifar-10-python.tar.gz": _sha(buf.getvalue())}))
    cfg = TrainConfig(dataset="cifar10", data_dir=str(tmp_path / "c"), image_size=32, channels=3, conditional=True)
    d = data.load(cfg)
    assert d.images.shape == (10, 3, 32, 32) and d.class_names[0] == "airplane"
    assert d.labels.tolist() == [1, 0, 2, 0, 3, 0, 4, 0, 5, 0]
    assert data.load(cfg.replace(split="test", channels=1)).images.shape == (3, 1, 32, 32)


def test_fit_resizes_with_antialiasing_and_converts_channels():
    x = torch.full((2, 3, 56, 56), 200, dtype=torch.uint8)
    y = data.fit(x, 28, 1)
    assert y.shape == (2, 1, 28, 28) and y.dtype == torch.uint8 and (y == 200).all()
    assert data.fit(y, 32, 3).shape == (2, 3, 32, 32)


def test_a_mirror_with_bad_bytes_is_skipped_for_a_good_one(http_root, tmp_path):
    www, url = http_root
    (www / "bad").mkdir()
    (www / "bad" / "f.gz").write_bytes(b"tampered")
    (www / "f.gz").write_bytes(b"original")
    paths = data.fetch(Remote((url + "bad/", url), {"f.gz": _sha(b"original")}), tmp_path / "cache")
    assert paths["f.gz"].read_bytes() == b"original"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["f.gz"]
