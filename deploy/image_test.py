"""Build the `serve` and `train` images and run them as a cluster would (`make image-test`; .ci/run runs it).

No Docker engine and no image registry are needed: podman builds and runs the images, on a Debian 12 base made
here with debootstrap (the local stand-in for debian:bookworm-slim, the Dockerfile's default base), and pip installs
from wheelhouse/ (`make wheelhouse ORT_PACKAGE=onnxruntime`, which `make image-test` runs first). Steps:

 1. toolchain  podman, runc and debootstrap from apt where missing (needs root, as rootful podman does);
 2. base       debootstrap --variant=minbase bookworm, trimmed as the slim image is, imported once and kept;
 3. build      `serve` with ONNX Runtime's CPU build, and `train`, offline (--no-index) from the wheelhouse;
 4. train      the train image as uid 10001 on a read-only root, no capabilities, `--preset tiny`, exporting into
               a mounted volume (models/tiny/1/model.onnx);
 5. serve      the serve image the same way, plus a tmpfs /tmp, on the baked-in model (mnist-cdcgan/4) and on
               that export, mounted beside it; SERVING through the image's own HEALTHCHECK command;
 6. inside     uid 10001 and no capabilities in PID 1, a read-only root, and `import torch` failing;
 7. generate   Generate on both models from this machine with the project's client; the PNGs decode;
 8. drain      SIGTERM in the middle of a GenerateStream: the stream completes, the server exits 0, within
               its grace period;
 9. s3         the serve image on a read-only root, its models from an S3 store (SeaweedFS on this machine,
               testkit/seaweed.py) holding the trained export: SERVING, and a grid from it.
Then it prints the image sizes and the time taken, and removes its containers, images and volume (the base stays,
as a cache). Any failure names its step and why, and exits 1; nothing is skipped.

Podman runs in its own storage (IMAGE_TEST_STORAGE, default ~/.cache/gan-serve-image-test) with the settings that
work inside a container as well as on a plain machine: vfs storage, runc, cgroupfs, host networking, no default
rlimits. They are this harness's, never the images'.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
WHEELHOUSE = ROOT / "wheelhouse"
STORAGE = Path(os.environ.get("IMAGE_TEST_STORAGE", Path.home() / ".cache" / "gan-serve-image-test"))
MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
SECURITY_MIRROR = os.environ.get("DEBIAN_SECURITY_MIRROR", "http://deb.debian.org/debian-security")
TOOLS = {"podman": "podman", "runc": "runc", "debootstrap": "debootstrap"}  # command: Debian package
BASE = "localhost/gan-image-test/debian:bookworm-slim-1"  # the suffix counts changes to make_base()
SERVE = "localhost/gan-image-test/serve:test"
TRAIN = "localhost/gan-image-test/train:test"
NAME = "gan-image-test"  # prefix of the containers this harness starts
UID = 10001  # the Dockerfile's USER
GRACE_S = 20.0  # the server's drain budget (GAN_GRACE_SECONDS) in this test
STREAM_IMAGES = 6000  # long enough to be mid-stream at SIGTERM, short enough to finish well inside GRACE_S
# What debian:bookworm-slim leaves out (debuerreotype's --slimify), so that the sizes measured here are the real ones.
SLIM_EXCLUDES = """\
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/overrides/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
"""
APT_CACHES = "/var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin"
APT_CLEAN = f"""\
DPkg::Post-Invoke {{ "rm -f {APT_CACHES} || true"; }};
APT::Update::Post-Invoke {{ "rm -f {APT_CACHES} || true"; }};
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
Acquire::Languages "none";
"""


class StepFailed(Exception):
    """A check that did not hold; the message says what was expected and what happened."""


def run(cmd: list[str], *, check: bool = True, timeout: float | None = 900, **kwargs) -> subprocess.CompletedProcess:
    """`cmd`, its output captured; on a non-zero exit (with check) a StepFailed with the command and its output."""
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    if check and out.returncode != 0:
        tail = "\n".join((out.stdout + out.stderr).strip().splitlines()[-25:])
        raise StepFailed(f"`{' '.join(cmd[:6])}{' ...' if len(cmd) > 6 else ''}` exited {out.returncode}:\n{tail}")
    return out


class Podman:
    """The podman command line with this harness's storage and sandbox settings."""

    def __init__(self, storage: Path):
        storage.mkdir(parents=True, exist_ok=True)
        conf = storage / "containers.conf"
        # No default rlimits: setting them fails inside containers that may not raise them (runc applies none then).
        conf.write_text('[containers]\ndefault_ulimits = []\n\n[engine]\nevents_logger = "file"\n')
        self.env = os.environ | {"CONTAINERS_CONF": str(conf)}
        self.base = [
            "podman", "--root", str(storage / "root"), "--runroot", str(storage / "run"),
            "--storage-driver", "vfs", "--runtime", "runc", "--cgroup-manager", "cgroupfs",
        ]  # fmt: skip

    def __call__(self, *args: str, check: bool = True, timeout: float | None = 900) -> subprocess.CompletedProcess:
        return run([*self.base, *args], check=check, timeout=timeout, env=self.env)

    def exists(self, image: str) -> bool:
        return self("image", "exists", image, check=False).returncode == 0

    def size(self, image: str) -> int:
        return int(self("image", "inspect", "--format", "{{.Size}}", image).stdout)

    def logs(self, container: str) -> str:
        out = self("logs", container, check=False)
        return "\n".join((out.stdout + out.stderr).strip().splitlines()[-30:])


# ---------------------------------------------------------------------------------------------------------------------
def toolchain() -> str:
    missing = sorted({pkg for cmd, pkg in TOOLS.items() if shutil.which(cmd) is None})
    if not missing:
        return "present"
    if os.geteuid() != 0:
        raise StepFailed(f"{', '.join(missing)} missing, and installing them with apt-get needs root")
    apt = ["apt-get", "install", "-y", "--no-install-recommends", *missing, "debian-archive-keyring"]
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    if run(apt, check=False, env=env).returncode != 0:  # the package lists are fetched only when apt has none
        run(["apt-get", "update"], env=env)
        run(apt, env=env)
    return f"installed {', '.join(missing)}"


def make_base(podman: Podman) -> str:
    if podman.exists(BASE):
        return f"{BASE} (cached)"
    with tempfile.TemporaryDirectory(dir=STORAGE) as tmp:
        rootfs = Path(tmp) / "rootfs"
        run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), MIRROR])
        (rootfs / "etc/dpkg/dpkg.cfg.d/slim").write_text(SLIM_EXCLUDES)
        (rootfs / "etc/apt/apt.conf.d/clean").write_text(APT_CLEAN)
        (rootfs / "etc/apt/sources.list").write_text(
            f"deb {MIRROR} bookworm main\ndeb {MIRROR} bookworm-updates main\n"
            f"deb {SECURITY_MIRROR} bookworm-security main\n"
        )
        for pattern in ("var/lib/apt/lists/*", "var/cache/apt/*.bin", "var/cache/apt/archives/*.deb",
                        "usr/share/man/*", "usr/share/info/*", "usr/share/locale/*", "usr/share/groff/*"):  # fmt: skip
            for path in rootfs.glob(pattern):
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        for path in (rootfs / "usr/share/doc").glob("*/*"):
            if path.name != "copyright":
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(
            [*podman.base, "import", "--change", 'CMD ["bash"]', "-", BASE],
            stdin=tar.stdout, capture_output=True, text=True, env=podman.env, check=False,
        )  # fmt: skip
        tar.wait()
        if tar.returncode or imported.returncode:
            raise StepFailed(f"podman import {BASE}: {imported.stderr.strip()}")
    return f"{BASE} built"


def build(podman: Podman, target: str, tag: str, *build_args: str) -> str:
    args = [f"--build-arg={a}" for a in (f"SERVE_BASE={BASE}", f"TRAIN_BASE={BASE}", *build_args)]
    # Docker format keeps HEALTHCHECK (OCI images have no field for it); one layer per stage, no cached
    # intermediates, since vfs copies the whole tree for each.
    start = time.monotonic()
    podman("build", "--network=host", "--pull=never", "--format=docker", "--layers=false", f"--target={target}",
           *args, f"--tag={tag}", str(ROOT))  # fmt: skip
    return f"{tag}: {time.monotonic() - start:.0f} s"


def secure(*extra: str) -> list[str]:
    """What deploy/ asks of a pod: the image's non-root user, a read-only root (without the tmpfs mounts podman adds
    by default), no capabilities, no privilege escalation."""
    return [
        "--user", f"{UID}:{UID}", "--read-only", "--read-only-tmpfs=false", "--cap-drop=ALL",
        "--security-opt=no-new-privileges", *extra,
    ]  # fmt: skip


def train(podman: Podman, volume: Path) -> Path:
    podman("run", "--rm", "--network=none", *secure("--tmpfs=/tmp"), f"--volume={volume}:/runs", TRAIN,
           "python", "-m", "training.run", "--preset", "tiny", "--out", "/runs/tiny", "--repository", "/runs/models",
           "--name", "tiny", "--no-progress")  # fmt: skip
    exported = volume / "models" / "tiny" / "1" / "model.onnx"
    if not exported.is_file():
        found = sorted(str(p.relative_to(volume)) for p in volume.rglob("*.onnx"))
        raise StepFailed(f"expected {exported.relative_to(volume)} in the volume; found {found or 'no ONNX file'}")
    return exported


def free_port() -> int:
    with socket.socket(socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def serve(podman: Podman, container: str, *options: str) -> dict[str, int]:
    """The serve image on a read-only root with `options` (mounts, variables); returns its ports once SERVING."""
    ports = {"GAN_PORT": free_port(), "GAN_HTTP_PORT": free_port(), "GAN_METRICS_PORT": free_port()}
    env = [f"--env={k}={v}" for k, v in ports.items()] + [f"--env=GAN_GRACE_SECONDS={GRACE_S:g}"]
    # Host networking (no network plugins needed) on free ports; the health check runs only when asked to.
    podman("run", "--detach", f"--name={container}", "--network=host", *secure("--tmpfs=/tmp"), *env, *options,
           f"--stop-timeout={GRACE_S + 10:g}", "--health-interval=disable", SERVE)  # fmt: skip
    deadline = time.monotonic() + 120
    while True:
        probe = podman("healthcheck", "run", container, check=False, timeout=30)
        if probe.returncode == 0:
            return ports
        state = podman("inspect", "--format", "{{.State.Status}}", container, check=False).stdout.strip()
        if state != "running":
            raise StepFailed(f"the server is {state or 'gone'} before reporting SERVING:\n{podman.logs(container)}")
        if time.monotonic() > deadline:
            raise StepFailed(f"not SERVING after 120 s ({probe.stdout.strip()}):\n{podman.logs(container)}")
        time.sleep(1)


def inside(podman: Podman, container: str) -> str:
    status = dict(
        line.split(":", 1) for line in podman("exec", container, "cat", "/proc/1/status").stdout.splitlines()
    )  # fmt: skip
    uids, cap_eff = status["Uid"].split(), int(status["CapEff"].strip(), 16)
    if set(uids) != {str(UID)} or cap_eff != 0:
        raise StepFailed(f"PID 1 runs with uids {uids} and effective capabilities {cap_eff:#x}; want {UID} and none")
    write = podman("exec", container, "touch", "/probe-write", check=False)
    if write.returncode == 0 or "Read-only file system" not in write.stderr:
        raise StepFailed(f"writing to / should fail on a read-only root; got {write.returncode}: {write.stderr}")
    torch = podman("exec", container, "python", "-c", "import torch", check=False)
    if torch.returncode == 0 or "No module named 'torch'" not in torch.stderr:
        raise StepFailed(f"`import torch` should fail with ModuleNotFoundError; got {torch.returncode}: {torch.stderr}")
    return f"uid {UID}, CapEff 0, read-only /, no torch"


def client(port: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "service.client", "--target", f"localhost:{port}", *args]


def generate(port: int, work: Path) -> str:
    listed = run(client(port, "models"), cwd=ROOT).stdout
    if not all(f"{name}  versions [{version}]" in listed for name, version in (("mnist-cdcgan", 4), ("tiny", 1))):
        raise StepFailed(f"want mnist-cdcgan version 4 (baked in) and tiny version 1 (trained); the server lists:\n"
                         f"{listed}")  # fmt: skip
    shapes = []
    for model in ("mnist-cdcgan", "tiny"):
        grid = work / f"{model}.png"
        run(client(port, "sample", "--model", model, "--seeds", "0-19", "--labels", "0-9", "--grid", str(grid)),
            cwd=ROOT)  # fmt: skip
        with Image.open(grid) as png:
            png.load()  # decodes every pixel
            if png.width < 10 * 28 or png.height < 2 * 28:
                raise StepFailed(f"{model}: a 10x2 grid of 28x28 images should be at least 280x56; got {png.size}")
            shapes.append(f"{model} {png.width}x{png.height} {png.mode}")
    return ", ".join(shapes)


def from_store(podman: Podman, export: Path, container: str, work: Path) -> str:
    sys.path.insert(0, str(ROOT))  # testkit, from the checkout this runs in
    from testkit.seaweed import SeaweedFS

    with SeaweedFS(work / "s3") as store:
        store.publish(export, "tiny", 1, "repository")
        # The credentials as a Secret's envFrom would give them; the downloads go to the tmpfs /tmp.
        env = [f"--env={k}={v}" for k, v in store.env.items()]
        port = serve(podman, container, *env, f"--env=GAN_MODEL_REPOSITORY=s3://{store.bucket}/repository")["GAN_PORT"]
        listed = run(client(port, "models"), cwd=ROOT).stdout
        if "tiny  versions [1]" not in listed:
            raise StepFailed(f"want tiny version 1 from the store; the server lists:\n{listed}")
        grid = work / "from-store.png"
        run(
            client(port, "sample", "--model", "tiny", "--seeds", "0-9", "--labels", "0-9", "--grid", str(grid)),
            cwd=ROOT,
        )
        with Image.open(grid) as png:
            png.load()
        podman("rm", "--force", container)
    return f"tiny/1 from s3://{store.bucket}/repository at {store.endpoint}: a {png.width}x{png.height} grid"


def drain(podman: Podman, port: int, container: str, work: Path) -> str:
    out = work / "stream"
    seeds = f"0-{STREAM_IMAGES - 1}"
    stream = subprocess.Popen(
        client(port, "sample", "--model", "mnist-cdcgan", "--seeds", seeds, "--labels", "0-9", "--out", str(out)),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not (out.is_dir() and any(out.iterdir())):
        if stream.poll() is not None or time.monotonic() > deadline:
            stream.kill()
            raise StepFailed(f"the stream never started: {stream.communicate()[1].strip()}")
        time.sleep(0.05)
    podman("kill", "--signal=TERM", container)
    sent = time.monotonic()
    received = len(list(out.iterdir()))
    try:
        _, stderr = stream.communicate(timeout=GRACE_S + 30)
    except subprocess.TimeoutExpired:
        stream.kill()
        raise StepFailed(f"the stream was still running {GRACE_S + 30:g} s after SIGTERM") from None
    code = podman("wait", container, timeout=GRACE_S + 30).stdout.strip()
    drained_s = time.monotonic() - sent
    saved = len(list(out.glob("*.png")))
    if received >= STREAM_IMAGES:
        raise StepFailed("the stream had finished before SIGTERM, so nothing was drained; raise STREAM_IMAGES")
    if stream.returncode != 0 or saved != STREAM_IMAGES:
        raise StepFailed(f"the stream should complete: client exit {stream.returncode}, {saved}/{STREAM_IMAGES}"
                         f" images; {stderr.strip()}\n{podman.logs(container)}")  # fmt: skip
    if code != "0":
        raise StepFailed(f"the server should exit 0 after a drain; it exited {code}:\n{podman.logs(container)}")
    if drained_s > GRACE_S:
        raise StepFailed(f"the drain took {drained_s:.1f} s, beyond the {GRACE_S:g} s grace period")
    logs = podman.logs(container)
    if "SIGTERM: draining" not in logs:
        raise StepFailed(f"the server did not log its drain:\n{logs}")
    return (f"SIGTERM after {received} of {STREAM_IMAGES} images; the stream completed, exit 0,"
            f" {drained_s:.1f} s after SIGTERM (grace {GRACE_S:g} s)")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    start = time.monotonic()
    print(f"== {name}", flush=True)
    try:
        yield
    except StepFailed as e:
        raise StepFailed(f"step '{name}' failed: {e}") from None
    except subprocess.TimeoutExpired as e:
        raise StepFailed(
            f"step '{name}' failed: `{' '.join(map(str, e.cmd[:6]))}` timed out after {e.timeout} s"
        ) from None
    print(f"   {name}: {time.monotonic() - start:.1f} s", flush=True)


def report(name: str, detail: str) -> None:
    print(f"   {name}: {detail}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="deploy/image_test.py", description=__doc__.splitlines()[0])
    p.add_argument(
        "--reuse",
        action="store_true",
        help="reuse the images of an earlier --reuse run if present, and keep them (for work on the checks)",
    )
    args = p.parse_args(argv)
    start = time.monotonic()
    podman: Podman | None = None
    work = Path(tempfile.mkdtemp(prefix="gan-image-test-"))
    container = f"{NAME}-serve-{os.getpid()}"
    try:
        with step("toolchain"):
            report("toolchain", toolchain())
            podman = Podman(STORAGE)
            # Left by a run killed before its clean-up, builds' working containers included: the storage is ours.
            for stale in podman("ps", "--all", "--external", "--quiet").stdout.split():
                podman("rm", "--force", stale)
        with step("base"):
            report("base", make_base(podman))
        with step("build"):
            if not any(WHEELHOUSE.glob("*.whl")):
                raise StepFailed(f"no wheels in {WHEELHOUSE.name}/: run `make wheelhouse ORT_PACKAGE=onnxruntime`")
            for target, tag, extra in (("serve", SERVE, ["ORT_PACKAGE=onnxruntime"]), ("train", TRAIN, [])):
                report(target, f"{tag} (reused)" if args.reuse and podman.exists(tag) else build(
                    podman, target, tag, *extra))  # fmt: skip
        with step("train"):
            volume = work / "runs"
            volume.mkdir()
            os.chown(volume, UID, UID)  # the volume a cluster would give the pod, writable by its user
            report("train", f"exported {train(podman, volume).relative_to(volume)}")
        with step("serve"):
            port = serve(podman, container, f"--volume={volume / 'models' / 'tiny'}:/models/tiny:ro")["GAN_PORT"]
            report("serve", f"SERVING on gRPC port {port}, by the image's HEALTHCHECK command")
        with step("inside"):
            report("inside", inside(podman, container))
        with step("generate"):
            report("generate", generate(port, work))
        with step("drain"):
            report("drain", drain(podman, port, container, work))
        with step("s3"):
            podman("rm", "--force", "--ignore", container)
            report("s3", from_store(podman, volume / "models" / "tiny" / "1" / "model.onnx", container, work))
        print("== image sizes")
        for image in (BASE, SERVE, TRAIN):
            print(f"   {image}: {podman.size(image) / 1e6:.0f} MB")
        print(f"== image-test passed in {time.monotonic() - start:.0f} s")
        return 0
    except StepFailed as e:
        print(f"image-test: {e}", file=sys.stderr)
        return 1
    finally:
        if podman is not None:
            podman("rm", "--force", "--ignore", container, check=False)
            if not args.reuse:
                podman("rmi", "--force", "--ignore", SERVE, TRAIN, check=False)
            podman("image", "prune", "--force", check=False)  # the untagged stage images
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
