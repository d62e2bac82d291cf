"""The shared event loop under hostile HTTP load: a gRPC 1-caller probe beside big JSON bodies, slow clients and
seed text; abandoned work; the OIP `timeout`. One server process, one run.

    python bench/loop_bench.py [--tree PATH] [--duration 8] [--json OUT]

Starts `python -m service` in the source tree `--tree` (default: this repository; any checkout works, such as a git
worktree of an earlier commit, since the wire API is the same) with that tree's shipped `models/` (mnist-cdcgan,
conditional). The probe is a closed loop of 1-image ganserve.v1 Generate calls (seeds [i], label index 3, raw
uint8) from this process, over one channel. The hostile clients run in processes of their own. Phases, in order:

- alone: the probe and nothing else;
- json: 2 clients each POST an OIP REST infer with a ~20 MB JSON `z` tensor (nested rows), over and over. It has
  more rows than `--max-images` and no labels, so the server refuses it; what counts is the probe;
- slowloris: 200 connections to the HTTP port, each sending one header byte a second. It reports how many the
  server closed within `--hold` seconds, and when;
- seeds: 1 client POSTs an OIP REST infer with 4 MB (3.8 MiB) of `parameters.seeds` text, over and over;
- abandon: a 4,096-image `images.png` whose client hangs up after 0.15 s, then one probe call: how long it
  waited. The same request run to the end first gives its full length;
- oip_timeout: an OIP REST infer of 4,096 images with `"timeout": 100000` (µs, Triton's convention; raw uint8
  output, binary extension, so the answer is no bigger than it must be): its status and time to answer, then one
  probe call.

Between phases the bench waits until the probe is fast again, so that work left over from one phase does not
count in the next.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import multiprocessing as mp
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import grpc
import numpy as np

from service.api.ganserve.v1 import generator_pb2 as pb
from service.api.ganserve.v1 import generator_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
MODEL, LABEL, BIG = "mnist-cdcgan", 3, 4096
# Both trees must accept a 4,096-image request: over the default --max-images (1024), under the queue.
FLAGS = ["--host", "127.0.0.1", "--port", "0", "--http-port", "0", "--metrics-port", "0", "--grace-seconds", "1",
         "--max-images", str(BIG), "--max-queue", "16384"]  # fmt: skip
INFER = f"/v2/models/{MODEL}/infer"
SLOW_HEADER = b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
STALL = 5.0  # target: the probe's p99 under load, and a call's wait after abandoned work, within 5× its p99 alone


class Server:
    """`python -m service` run in `tree`; ports from the JSON line it prints once serving; stderr kept (its tail)."""

    def __init__(self, tree: Path):
        args = [sys.executable, "-m", "service", "--model-repository", str(tree / "models"), *FLAGS]
        self.proc = subprocess.Popen(args, cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.log: collections.deque[str] = collections.deque(maxlen=30)
        drain = threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True)
        drain.start()
        watchdog = threading.Timer(180, self.proc.kill)
        watchdog.start()
        line = self.proc.stdout.readline()
        watchdog.cancel()
        if not line:
            status = self.proc.wait()
            drain.join(5)
            raise RuntimeError(f"the server did not start (exit status {status}):\n{''.join(self.log)}")
        ready = json.loads(line)
        self.port, self.http_port = ready["port"], ready["http_port"]

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def small(i: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(model=MODEL, seeds=pb.SeedList(seeds=[i]), labels=[pb.Label(index=LABEL)],
                              output=pb.OutputOptions(format=pb.RAW_UINT8))  # fmt: skip


async def timed(stub: pb_grpc.GeneratorStub, i: int = 0) -> float:
    t = time.perf_counter()
    await stub.Generate(small(i), timeout=300)
    return time.perf_counter() - t


async def probe(stub: pb_grpc.GeneratorStub, seconds: float) -> list[float]:
    latencies: list[float] = []
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        latencies.append(await timed(stub, len(latencies)))
    return latencies


async def settle(stub: pb_grpc.GeneratorStub, fast: float, limit: float = 120) -> float:
    """Seconds until two probe calls in a row take under `fast`: the server has finished what it was doing."""
    start, streak = time.perf_counter(), 0
    while streak < 2 and time.perf_counter() - start < limit:
        streak = streak + 1 if await timed(stub) < fast else 0
    return time.perf_counter() - start


# ---- hostile clients, each in a process of its own ----------------------------------------------------------------


def json_body(megabytes: float) -> bytes:
    """An OIP infer body of about `megabytes` MB: a z tensor as nested JSON rows of 100 numbers, no labels."""
    row = "[" + ",".join(["-0.83461237"] * 100) + "]"
    rows = max(1, int(megabytes * 1e6) // (len(row) + 1))
    z = {"name": "z", "datatype": "FP32", "shape": [rows, 100], "data": "DATA"}
    return json.dumps({"inputs": [z]}).replace('"DATA"', "[" + ",".join([row] * rows) + "]").encode()


def seeds_body() -> bytes:
    return json.dumps({"parameters": {"seeds": ",".join(["1"] * 2_000_000), "labels": str(LABEL)}}).encode()


async def poster(port: int, body: bytes, ready, stats: dict) -> None:
    """POST `body` to the infer route, one after another; every answer's status (or error) and time."""
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
        ready.set()
        while True:
            t = time.perf_counter()
            try:
                async with session.post(INFER, data=body, headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    key = str(r.status)
            except aiohttp.ClientError as e:
                key = type(e).__name__
            stats["answers"][key] = stats["answers"].get(key, 0) + 1
            stats["seconds"].append(time.perf_counter() - t)


async def slowloris(port: int, n: int, ready, stats: dict) -> None:
    """`n` connections, each sending one byte of an endless header a second; when the server closed each one."""
    conns = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port) for _ in range(n)))
    ready.set()

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        opened, i = time.perf_counter(), 0
        heard = asyncio.ensure_future(reader.read(1 << 16))  # an answer (408, 400) or EOF: the server let go
        try:
            while not heard.done():
                writer.write(SLOW_HEADER[i : i + 1] or b"a")
                i += 1
                await writer.drain()
                await asyncio.wait([heard], timeout=1.0)
        except OSError:
            pass
        finally:
            if heard.done() and not heard.cancelled():
                heard.exception()  # retrieved: a reset is an answer too
            heard.cancel()
            writer.close()
        stats["closed"].append(time.perf_counter() - opened)

    await asyncio.gather(*(trickle(r, w) for r, w in conns))


def background(kind: str, port: int, arg: float, ready, stop, out) -> None:
    """One hostile client (a process target): runs until `stop` is set, then puts what it saw on `out`."""
    stats: dict = {"kind": kind, "answers": {}, "seconds": [], "closed": []}

    async def run() -> None:
        if kind == "slowloris":
            task = asyncio.ensure_future(slowloris(port, int(arg), ready, stats))
        else:
            body = json_body(arg) if kind == "json" else seeds_body()
            stats["body_bytes"] = len(body)
            task = asyncio.ensure_future(poster(port, body, ready, stats))
        while not task.done() and not stop.is_set():
            await asyncio.sleep(0.05)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    try:
        asyncio.run(run())
    except Exception as e:  # reported in the table, not a hang
        stats["error"] = repr(e)
    finally:
        ready.set()
        out.put(stats)


async def under(stub, kind: str, clients: int, port: int, arg: float, seconds: float, hold: float = 0):
    """The probe for `seconds` while `clients` processes of `kind` run (kept on until `hold` s after they start)."""
    ctx = mp.get_context("spawn")  # not fork: this process has gRPC threads
    out, stop = ctx.Queue(), ctx.Event()
    readies = [ctx.Event() for _ in range(clients)]
    procs = [ctx.Process(target=background, args=(kind, port, arg, r, stop, out), daemon=True) for r in readies]
    for p in procs:
        p.start()
    for r in readies:
        r.wait(120)
    start = time.perf_counter()
    latencies = await probe(stub, seconds)
    await asyncio.sleep(max(0.0, hold - (time.perf_counter() - start)))
    stop.set()
    loads = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    return latencies, loads


# ---- single shots ---------------------------------------------------------------------------------------------------


async def abandon(stub, http_port: int, fast: float, after: float = 0.15) -> dict:
    """The 4,096-image grid run to the end (for its length), then abandoned after `after` s and one probe call."""
    path = f"/v1/models/{MODEL}/images.png?seeds=0-{BIG - 1}&label={LABEL}"
    async with aiohttp.ClientSession(f"http://127.0.0.1:{http_port}") as session:
        t = time.perf_counter()
        async with session.get(path) as r:
            await r.read()
            full = {"status": r.status, "seconds": time.perf_counter() - t}
    await settle(stub, fast)
    _, writer = await asyncio.open_connection("127.0.0.1", http_port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await writer.drain()
    await asyncio.sleep(after)
    writer.close()
    return {"full": full, "waited": await timed(stub)}


async def oip_timeout(stub, http_port: int, micros: int = 100_000) -> dict:
    parameters = {"seed_start": 0, "count": BIG, "labels": str(LABEL), "timeout": micros, "datatype": "UINT8",
                  "binary_data_output": True}  # fmt: skip
    async with aiohttp.ClientSession(f"http://127.0.0.1:{http_port}") as session:
        t = time.perf_counter()
        async with session.post(INFER, json={"parameters": parameters}) as r:
            body = await r.read()
            seconds = time.perf_counter() - t
            head = body[: int(r.headers.get("Inference-Header-Content-Length", 200))]  # the JSON, not the pixels
    return {
        "status": r.status,
        "seconds": seconds,
        "body": head[:200].decode(errors="replace"),
        "after": await timed(stub),
    }


# ---- the run --------------------------------------------------------------------------------------------------------


async def measure(server: Server, args) -> dict:
    d, got = args.duration, {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.GeneratorStub(channel)
        for i in range(5):  # warm-up: the channel, the session, the first batches
            await timed(stub, i)
        got["alone"] = {"latencies": await probe(stub, d)}
        fast = max(0.05, 5 * float(np.percentile(got["alone"]["latencies"], 50)))
        report("alone", got["alone"])
        for name, kind, clients, arg, hold in (
            ("json", "json", 2, args.json_mb, 0),
            ("slowloris", "slowloris", 1, args.slow_clients, max(args.hold, d)),
            ("seeds", "seeds", 1, 0, 0),
        ):
            latencies, loads = await under(stub, kind, clients, server.http_port, arg, d, hold)
            got[name] = {"latencies": latencies, "loads": loads, "settled_s": await settle(stub, fast)}
            report(name, got[name])
        a = got["abandon"] = await abandon(stub, server.http_port, fast)
        a["settled_s"] = await settle(stub, fast)
        print(f"abandon: whole request {a['full']['status']} in {a['full']['seconds']:.2f} s; abandoned at 0.15 s,"
              f" the next small call waited {a['waited'] * 1000:,.0f} ms", flush=True)  # fmt: skip
        got["oip_timeout"] = await oip_timeout(stub, server.http_port)
        o = got["oip_timeout"]
        print(f"oip_timeout: {o['status']} after {o['seconds'] * 1000:,.0f} ms ({o['body'][:80]!r});"
              f" the next small call took {o['after'] * 1000:,.0f} ms", flush=True)  # fmt: skip
    return got


def pct(latencies: list[float], q: float) -> float:
    return float(np.percentile(latencies, q)) * 1000 if latencies else float("nan")


def describe(name: str, phase: dict, args) -> str:
    """What ran beside the probe, in words: answers and their times, or connections closed."""
    loads = phase.get("loads", [])
    errors = "; ".join(f"client error {x['error']}" for x in loads if "error" in x)
    if name == "slowloris":
        closed = sorted(t for x in loads for t in x["closed"])
        hold = max(args.hold, args.duration)
        when = f", first at {closed[0]:.1f} s, last at {closed[-1]:.1f} s" if closed else ""
        text = f"{args.slow_clients} connections trickling 1 header byte/s: {len(closed)} closed by the server"
        text += f" within {hold:.0f} s{when}"
        return text + (f"; {errors}" if errors else "")
    answers: collections.Counter[str] = collections.Counter()
    for x in loads:
        answers.update(x["answers"])
    seconds = [t for x in loads for t in x["seconds"]]
    size = max((x.get("body_bytes", 0) for x in loads), default=0) / 1e6
    what = f"{len(loads)} client{'s' if len(loads) > 1 else ''} posting {size:.1f} MB "
    what += "of JSON z rows" if name == "json" else "of seeds text"
    counts = ", ".join(f"{k} ×{v}" for k, v in sorted(answers.items())) or "none"
    median = f", {np.median(seconds):.2f} s each (median)" if seconds else ""
    return f"{what}: answers {counts}{median}" + (f"; {errors}" if errors else "")


def report(name: str, phase: dict) -> None:
    lat = phase["latencies"]
    print(f"{name}: {len(lat)} calls, p50 {pct(lat, 50):.1f} ms, p99 {pct(lat, 99):.1f} ms, max {pct(lat, 100):.1f} ms"
          + (f"; settled {phase['settled_s']:.1f} s after" if "settled_s" in phase else ""), flush=True)  # fmt: skip


def table(got: dict, args) -> list[str]:
    """The table, and one line per missed target saying what it points at."""
    alone99 = pct(got["alone"]["latencies"], 99)
    rows, misses = [], []
    for name in ("alone", "json", "slowloris", "seeds"):
        lat = got[name]["latencies"]
        ratio = pct(lat, 99) / alone99
        target = "–" if name == "alone" else f"p99 ≤ {STALL:.0f}× alone"
        met = name == "alone" or ratio <= STALL
        if name == "slowloris":
            target += ", all closed"
            met = met and sum(len(x["closed"]) for x in got[name]["loads"]) == args.slow_clients
        beside = "nothing" if name == "alone" else describe(name, got[name], args)
        rows.append((name, f"{len(lat)}", f"{pct(lat, 50):,.1f}", f"{pct(lat, 99):,.1f}", f"{pct(lat, 100):,.1f}",
                     f"{ratio:.1f}", target + ("" if met else " **missed**"), beside))  # fmt: skip
        if ratio > STALL:
            misses.append(f"{name}: the probe's p99 is {ratio:.0f}× its p99 alone: {why(name, got[name])}")
    slow = got["slowloris"]["loads"]
    closed = sum(len(x["closed"]) for x in slow)
    if closed < args.slow_clients:
        misses.append(f"slowloris: {args.slow_clients - closed} of {args.slow_clients} slow connections still open"
                      f" after {max(args.hold, args.duration):.0f} s: no header-read timeout, or a longer one")  # fmt: skip
    a = got["abandon"]
    waited = a["waited"] * 1000
    ok = waited <= STALL * alone99
    rows.append(("abandon", "1", f"{waited:,.1f}", "–", "–", f"{waited / alone99:.1f}",
                 f"≤ {STALL:.0f}× alone p99" + ("" if ok else " **missed**"),
                 f"a small call's wait after a {BIG:,}-image images.png abandoned at 0.15 s (the whole request, run to "
                 f"the end before: {a['full']['status']} in {a['full']['seconds'] * 1000:,.0f} ms)"))  # fmt: skip
    if not ok and a["waited"] * 2 < a["full"]["seconds"]:
        misses.append("abandon: its queued pieces were dropped; the small call waited for the pieces already running on"
                      " the workers, which a thread cannot be stopped in")  # fmt: skip
    elif not ok:
        misses.append("abandon: the abandoned request's work was not cancelled when its client left; it ran on, ahead"
                      " of the small call in the model's queue")  # fmt: skip
    o = got["oip_timeout"]
    ok = o["status"] == 504 and o["seconds"] < 1.0
    rows.append(("oip_timeout", "1", f"{o['seconds'] * 1000:,.1f}", "–", "–", "–",
                 "504 within 1 s" + ("" if ok else " **missed**"),
                 f"OIP REST infer of {BIG:,} images with timeout 100,000 µs: {o['status']}; a small call right after: "
                 f"{o['after'] * 1000:,.1f} ms"))  # fmt: skip
    if o["status"] != 504:
        misses.append(f"oip_timeout: answered {o['status']} after {o['seconds']:.1f} s: the timeout was not a deadline")
    elif not ok:
        misses.append(
            f"oip_timeout: 504 only after {o['seconds']:.1f} s: the deadline is checked late, not while queued"
        )
    lines = ["| probe | calls | p50 ms | p99 ms | max ms | p99 ÷ alone | target | beside it |", "|" + "---|" * 8]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines + [""] + [f"- {m}" for m in misses]


WHY = {  # what a miss points at, by what the hostile clients were answered
    "json": "the bodies are parsed (json.loads, np.asarray over nested rows) on the event loop gRPC shares, or off it"
    " while holding the GIL; a JSON body limit would refuse them before they are read",
    "json 413": "the bodies are refused by their Content-Length before any of them is parsed; what is left is the loop"
    " receiving the megabytes each client sends anyway (aiohttp reads a refused body to keep the connection usable),"
    " on the cores the clients share",
    "slowloris": "the slow connections cost the loop a wake-up per byte, or crowd it",
    "seeds": "the seeds text is expanded on the event loop before any bound on its length",
    "seeds fast": "the bodies are under the JSON limit, so each is read and parsed (off the loop, in a thread that holds"
    " the GIL while json.loads runs) before the text's length refuses it in microseconds",
}


def why(name: str, phase: dict) -> str:
    answers: collections.Counter[str] = collections.Counter()
    for x in phase.get("loads", []):
        answers.update(x["answers"])
    seconds = [t for x in phase.get("loads", []) for t in x["seconds"]]
    if name == "json" and "413" in answers:
        return WHY["json 413"]
    if name == "seeds" and seconds and np.median(seconds) < 0.1:
        return WHY["seeds fast"]
    return WHY[name]


def commit(tree: Path) -> str:
    run = subprocess.run(["git", "-C", str(tree), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return run.stdout.strip() or "not a git checkout"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree", type=Path, default=ROOT, help="the source tree whose server and models/ to run")
    p.add_argument("--duration", type=float, default=8.0, help="seconds of probing per phase")
    p.add_argument("--json-mb", type=float, default=20.0, help="size of each JSON infer body, MB (under 64 MiB)")
    p.add_argument("--slow-clients", type=int, default=200, help="slowloris connections")
    p.add_argument("--hold", type=float, default=20.0, help="seconds the slow connections keep trickling")
    p.add_argument("--json", type=Path, help="write the raw figures here (latencies in seconds)")
    args = p.parse_args()
    tree = args.tree.resolve()
    print(f"tree {tree} ({commit(tree)}), {args.duration:g} s per phase", flush=True)
    server = Server(tree)
    try:
        got = asyncio.run(measure(server, args))
    finally:
        server.close()
    print("\n" + "\n".join(table(got, args)))
    if args.json:
        raw = {"tree": str(tree), "commit": commit(tree), "args": {k: str(v) for k, v in vars(args).items()}} | got
        args.json.write_text(json.dumps(raw, indent=1, default=str))


if __name__ == "__main__":
    main()
