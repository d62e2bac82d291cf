"""Soak: the service at saturation for minutes, with a new version of every model published every so often.

    python bench/soak.py [--minutes 10] [--concurrency 16] [--reload-every 60] [--json soak.json]

Builds a temporary repository (the shipped mnist-cdcgan plus a DCGAN and the paper's MLP generator with one
training step each, as serve_bench.py does), starts `python -m service` on it, and drives testkit/load.py's
closed loop (Generate, GenerateStream in 2-image chunks, Interpolate; raw uint8; latest version) against every
model. Every --reload-every seconds it copies each model's newest version to version N+1 (written under a
staging name, then renamed into place, so it appears whole) and sends SIGHUP. Reports errors by code,
throughput per 30-s window, the server's RSS every minute and its growth from minute 1 to the end, and which
versions answered when. Exits 1 when any call failed. Goals: no errors, RSS growth under 5%.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: `bench` lives in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc

from bench.serve_bench import Process
from testkit.load import Shape, Tally, closed_loop, discover

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "models" / "mnist-cdcgan" / "2"
WINDOW_S = 30.0
RSS_EVERY_S = 60.0
RSS_GROWTH_GOAL = 5.0  # percent, minute 1 to the end
SHAPE = Shape(images=2, stream_images=6, steps=2)
SERVER_ENV = {
    "GAN_PORT": "0",
    "GAN_METRICS_PORT": "0",
    "GAN_HTTP_PORT": "0",
    "GAN_HOST": "127.0.0.1",
    "GAN_GRACE_SECONDS": "5",
    "GAN_STREAM_CHUNK": "2",  # several messages per stream, so errors between chunks can show
}


@dataclass(frozen=True)
class Reload:
    at: float  # seconds since the load started
    model: str
    version: int
    first_answer_s: float | None  # from the SIGHUP to the first latest-version answer from it; None: never
    # From the SIGHUP to the start of the last latest-version call the version before it answered.
    previous_last_sent_s: float | None


def build_repository(repo: Path) -> None:
    """The shipped model as it is, plus two built ones; torch runs in a child process, never in this one."""
    shutil.copytree(SHIPPED, repo / "mnist-cdcgan" / SHIPPED.name)
    code = f"from bench.serve_bench import build_models; from pathlib import Path; build_models(Path({str(repo)!r}))"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)})


def publish(repo: Path, model: str) -> int:
    """Copy the newest version of `model` to the next number, atomically by rename; returns the new version."""
    versions = [int(p.name) for p in (repo / model).iterdir() if p.name.isdigit()]
    new = max(versions) + 1
    staging = repo / model / f".staging-{new}"
    shutil.copytree(repo / model / str(max(versions)), staging)
    os.rename(staging, repo / model / str(new))
    return new


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def soak(server: Process, repo: Path, minutes: float, concurrency: int, reload_every: float) -> dict:
    """Drive the load, publish and SIGHUP on schedule, sample RSS; the summary as plain data."""
    total = minutes * 60
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        targets = await discover(channel)
        stop, tally = asyncio.Event(), Tally()
        rss = [(0.0, rss_bytes(server.proc.pid))]
        load = asyncio.create_task(closed_loop(channel, targets, concurrency, stop, shape=SHAPE, tally=tally))
        # At equal times: RSS first (before a reload's copies load), the end last.
        events = sorted(
            [(k * RSS_EVERY_S, 0, "rss") for k in range(1, int(total // RSS_EVERY_S) + 1)]
            + [(k * reload_every, 1, "reload") for k in range(1, int(-(-total // reload_every)))]
            + [(total, 2, "end")]
        )
        published: list[tuple[float, str, int]] = []
        for at, _, what in events:
            await asyncio.sleep(max(0.0, tally.origin + at - time.monotonic()))
            if load.done():  # the driver itself broke: say why now
                await load
            now = time.monotonic() - tally.origin
            if what == "rss":
                rss.append((now, rss_bytes(server.proc.pid)))
            elif what == "reload":
                for t in targets:
                    published.append((now, t.model, publish(repo, t.model)))
                server.proc.send_signal(signal.SIGHUP)
                print(f"{now:6.1f} s  published {', '.join(f'{m} v{v}' for _, m, v in published[-len(targets) :])}; SIGHUP", flush=True)  # fmt: skip
            else:
                stop.set()
        await load
    end = max((c.end for c in tally.calls), default=time.monotonic()) - tally.origin
    if rss[-1][0] < total - 1:  # a run shorter than a minute still gets an end sample
        rss.append((end, rss_bytes(server.proc.pid)))
    reloads = []
    for at, model, version in published:
        seen, sent = tally.first_seen(model).get(version), tally.last_sent(model)
        before = [v for v in sent if v < version]
        last = sent[max(before)] - tally.origin - at if before else None
        reloads.append(Reload(at, model, version, None if seen is None else seen - tally.origin - at, last))
    return summarize(tally, rss, reloads, end, total)


def summarize(tally: Tally, rss: list[tuple[float, int]], reloads: list[Reload], seconds: float, until: float) -> dict:
    """Plain data for the report and --json; windows end at `until` (calls finishing after the stop are left out)."""
    failures = Counter((c.method, c.code.name, c.details) for c in tally.failures())
    windows = [
        {
            "start_s": w.start,
            "end_s": w.end,
            "calls_per_s": w.calls_per_s,
            "images_per_s": w.images_per_s,
            "failed": w.failed,
            "versions": {f"{m} v{v}": n for (m, v), n in sorted(w.versions.items())},
        }
        for w in tally.windows(WINDOW_S, until=tally.origin + until)
    ]
    after_minute = [b for t, b in rss if t >= RSS_EVERY_S - 1]
    growth = 100 * (after_minute[-1] - after_minute[0]) / after_minute[0] if len(after_minute) > 1 else None
    ok = [c for c in tally.calls if c.ok]
    return {
        "seconds": seconds,
        "calls": len(tally.calls),
        "ok": len(ok),
        "images": sum(c.images for c in ok),
        "codes": dict(tally.counts()),
        "errors": [{"method": m, "code": code, "details": d, "count": n} for (m, code, d), n in failures.most_common()],
        "windows": windows,
        "rss": [{"at_s": t, "bytes": b} for t, b in rss],
        "rss_growth_pct": growth,
        "reloads": [asdict(r) for r in reloads],
    }


def problems(log: str) -> list[str]:
    """Distinct WARNING/ERROR records of a server log (timestamps dropped), each with its count and the last
    line of its traceback, most frequent first."""
    found: Counter = Counter()
    record = ""
    for line in [*log.splitlines(), "1970-01-01 00:00:00,000 INFO end"]:
        head = line.split(" ", 2)
        if len(head) == 3 and head[0][:4].isdigit():  # a new record: count the one before
            if record:
                found[record] += 1
            message = head[2]
            record = message if message.startswith(("WARNING ", "ERROR ", "CRITICAL ")) else ""
        elif record and line.strip() and not line.startswith((" ", "Traceback")):
            record = record.split(" ⟶ ")[0] + " ⟶ " + line.strip()  # the exception line of its traceback
    return [f"{n} × {r}" for r, n in found.most_common()]


def report(s: dict, log_errors: list[str]) -> None:
    print(
        f"\n{s['calls']:,} calls in {s['seconds']:.0f} s: {s['ok']:,} OK, {s['ok'] / s['seconds']:,.1f} calls/s, {s['images'] / s['seconds']:,.1f} images/s"
    )
    print("codes: " + ", ".join(f"{k} {v:,}" for k, v in sorted(s["codes"].items())))
    for e in s["errors"][:20]:
        print(f"  {e['count']:>6} × {e['method']} {e['code']}: {e['details']}")
    print("\n| window | calls/s | images/s | failed | versions answering (OK calls) |\n|---|---|---|---|---|")
    for w in s["windows"]:
        versions = ", ".join(f"{k}: {n}" for k, n in w["versions"].items())
        print(
            f"| {w['start_s']:.0f}–{w['end_s']:.0f} s | {w['calls_per_s']:,.1f} | {w['images_per_s']:,.1f} | {w['failed']} | {versions} |"
        )
    print("\n| at | server RSS |\n|---|---|")
    for r in s["rss"]:
        print(f"| {r['at_s']:.0f} s | {r['bytes'] / 2**20:,.1f} MiB |")
    growth = s["rss_growth_pct"]
    if growth is not None:
        verdict = "met" if growth < RSS_GROWTH_GOAL else "MISSED"
        print(f"RSS growth minute 1 → end: {growth:+.1f}% (goal < {RSS_GROWTH_GOAL:.0f}%: {verdict})")
    print("\n| published at | model | version | its first answer | last call sent to the version before |")
    print("|---|---|---|---|---|")
    for r in s["reloads"]:
        first, last = (
            "never" if t is None else f"{t:+.2f} s" for t in (r["first_answer_s"], r["previous_last_sent_s"])
        )
        print(f"| {r['at']:.0f} s | {r['model']} | {r['version']} | {first} | {last} |")
    print("(times from the SIGHUP; latest-version calls only)")
    print(f"\nserver log: {len(log_errors)} distinct warning/error record(s)")
    for line in log_errors[:20]:
        print("  " + line)
    print(f"\nerrors: {s['calls'] - s['ok']:,} (goal 0)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0, help="how long the load runs")
    p.add_argument("--concurrency", type=int, default=16, help="callers in the closed loop")
    p.add_argument("--reload-every", type=float, default=60.0, help="seconds between published versions")
    p.add_argument("--json", type=Path, help="also write the summary here")
    args = p.parse_args()
    if args.minutes <= 0 or args.concurrency < 1 or args.reload_every <= 0:
        p.error("--minutes and --reload-every must be > 0, --concurrency >= 1")
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        repo = Path(tmp) / "models"
        build_repository(repo)
        command = [sys.executable, "-m", "service", "--model-repository", str(repo)]
        server = Process(command, SERVER_ENV, log=Path(tmp) / "server.log")
        try:
            summary = asyncio.run(soak(server, repo, args.minutes, args.concurrency, args.reload_every))
        finally:
            status = server.close()
        log_errors = problems(server.log.read_text())
    summary |= {"config": vars(args) | {"json": str(args.json) if args.json else None}, "server_exit_status": status}
    summary["server_log_errors"] = log_errors
    report(summary, log_errors)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    sys.exit(1 if summary["errors"] else 0)


if __name__ == "__main__":
    main()
