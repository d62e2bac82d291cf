"""Fuzz a server process with tens of thousands of cases: typed requests, raw bytes and header garbage.

    python -m bench.fuzz [--cases 20000] [--concurrency 16] [--seed N]

The cases and the verdict on each answer are testkit/fuzzcases.py's; tests/test_fuzz.py runs a smaller number of
them in CI. This script builds a repository with the shipped model (models/mnist-cdcgan) and the small test models,
starts `python -m service` on free ports with the same small request limits as the test, and keeps `--concurrency`
calls in flight. It reports the status codes by kind of case, every kind of wrong answer with a few examples
(messages that name no field, traceback text, undocumented codes), the server's resident memory before and after,
the time taken, and whether it still serves at the end. Exit status 1 on INTERNAL, UNKNOWN, traceback text or a
server that no longer serves.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
from hypothesis import HealthCheck, Phase, given, seed, settings

from testkit.fuzzcases import (
    LIMITS,
    Case,
    alive,
    build_repository,
    call,
    metadata_cases,
    open_channel,
    raw_cases,
    served_services,
    typed_cases,
    verdict,
)

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "models" / "mnist-cdcgan"
KINDS = {"typed": (typed_cases(), 0.5), "raw": (raw_cases(), 0.35), "metadata": (metadata_cases(), 0.15)}
FAILING = {"INTERNAL", "UNKNOWN"}
EXAMPLES = 3  # cases shown per kind of wrong answer


def rss_mib(pid: int) -> float:
    """Resident memory of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(repo: Path, log: Path) -> tuple[subprocess.Popen, dict]:
    """`python -m service` on free ports; the process and its ready line."""
    env = os.environ | {"GAN_PORT": "0", "GAN_METRICS_PORT": "0", "GAN_HTTP_PORT": "0", "GAN_HOST": "127.0.0.1"}
    env |= {f"GAN_{name.upper()}": str(value) for name, value in LIMITS.items()}
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service", "--model-repository", str(repo)],
            stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=ROOT,
        )  # fmt: skip
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"the server did not start:\n{log.read_text()[-4000:]}")
    return proc, json.loads(line)


def logged_tracebacks(log: str) -> collections.Counter[tuple[str, str]]:
    """(the log line before it, the exception line) of each traceback in the server's log."""
    found: collections.Counter[tuple[str, str]] = collections.Counter()
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Traceback"):
            end = next((j for j in range(i + 1, len(lines)) if not lines[j].startswith((" ", "Traceback"))), i)
            found[lines[i - 1] if i else "", lines[end]] += 1
    return found


class Tally:
    """Outcomes by kind and code, and the wrong answers with their first examples; thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.codes: collections.Counter[tuple[str, str]] = collections.Counter()
        self.problems: collections.Counter[tuple[str, str]] = collections.Counter()
        self.examples: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
        self.fields: collections.Counter[tuple[str, str, str]] = collections.Counter()  # refusals by field named
        self.done = 0

    def add(self, case: Case, code: grpc.StatusCode | None, details: str, problem: str | None) -> None:
        name = "CLIENT_ERROR" if code is None else code.name
        with self.lock:
            self.done += 1
            self.codes[case.kind, name] += 1
            if details:
                self.fields[case.kind, name, details.split(":", 1)[0][:40]] += 1
            if problem is not None:
                key = (case.kind, problem)
                self.problems[key] += 1
                if len(self.examples[key]) < EXAMPLES:
                    self.examples[key].append(f"{case!r}\n        -> {name} {details[:300]!r}")


def drive(
    kind: str, n: int, channel: grpc.Channel, served: set[str], pool: concurrent.futures.Executor,
    slots: threading.Semaphore, tally: Tally, rng: random.Random,
) -> None:  # fmt: skip
    """Draw `n` cases of `kind` with Hypothesis and hand each to the pool; at most `slots` in flight."""
    strategy = KINDS[kind][0]
    submitted = 0

    def one(case: Case) -> None:
        try:
            code, details = call(channel, case)
        except Exception as e:  # the client could not send it: counted, so that no case goes missing
            tally.add(case, None, repr(e), f"the client failed: {type(e).__name__}")
            return
        tally.add(case, code, details, verdict(case, code, details, served))

    def release(_future: concurrent.futures.Future) -> None:
        slots.release()

    while submitted < n:  # Hypothesis may stop a little short of max_examples: top up

        @seed(rng.getrandbits(64))
        @settings(
            max_examples=n - submitted, phases=[Phase.generate], deadline=None, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
        )  # fmt: skip
        @given(strategy)
        def submit(case: Case) -> None:
            nonlocal submitted
            if submitted >= n:
                return
            slots.acquire()
            pool.submit(one, case).add_done_callback(release)
            submitted += 1

        submit()


def progress(tally: Tally, total: int, start: float, stop: threading.Event) -> None:
    while not stop.wait(5):
        with tally.lock:
            done, bad = tally.done, sum(tally.problems.values())
        rate = done / (time.perf_counter() - start)
        print(f"  {done:>7,} / {total:,} cases  {rate:,.0f}/s  wrong answers so far: {bad}", file=sys.stderr)


def report(tally: Tally, elapsed: float, rss: tuple[float, float], serving: str) -> bool:
    """Print the results; True when nothing failed."""
    codes = sorted({code for _, code in tally.codes})
    print(f"\n{'kind':<10}" + "".join(f"{c:>20}" for c in codes) + f"{'total':>10}")
    for kind in KINDS:
        row = [tally.codes[kind, c] for c in codes]
        print(f"{kind:<10}" + "".join(f"{v:>20,}" for v in row) + f"{sum(row):>10,}")
    print("\nmost frequent refusals, by the field they name:")
    for (kind, code, field), count in tally.fields.most_common(12):
        print(f"  {count:>6,}  {kind:<9} {code:<20} {field}")
    print("\nwrong answers:" + ("" if tally.problems else " none"))
    for (kind, problem), count in tally.problems.most_common():
        print(f"  {count:>6,}  {kind:<9} {problem}")
        for example in tally.examples[kind, problem]:
            print(f"      e.g. {example}")
    unnamed = sum(n for (_, p), n in tally.problems.items() if "field" in p)
    tracebacks = sum(n for (_, p), n in tally.problems.items() if "traceback" in p)
    failing = sum(n for (_, c), n in tally.codes.items() if c in FAILING)
    print(f"\nmessages naming no field: {unnamed:,}   traceback text: {tracebacks:,}   INTERNAL/UNKNOWN: {failing:,}")
    print(f"server RSS: {rss[0]:,.0f} MiB before, {rss[1]:,.0f} MiB after ({rss[1] - rss[0]:+,.0f} MiB)")
    print(f"{tally.done:,} cases in {elapsed:,.1f} s ({tally.done / elapsed:,.0f}/s); at the end: {serving}")
    return not (failing or tracebacks) and serving == "SERVING"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=20_000, help="cases in all, split over the kinds (default 20000)")
    p.add_argument("--concurrency", type=int, default=16, help="calls in flight (default 16)")
    p.add_argument("--seed", type=int, default=None, help="Hypothesis seed; random by default")
    args = p.parse_args(argv)
    rng_seed = random.randrange(2**32) if args.seed is None else args.seed
    rng = random.Random(rng_seed)

    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        repo = build_repository(Path(tmp) / "models")
        shutil.copytree(SHIPPED, repo / SHIPPED.name)
        proc, ready = start_server(repo, Path(tmp) / "server.log")
        try:
            with open_channel(ready["port"]) as channel:
                served = served_services(channel)
                print(f"server pid {proc.pid} on port {ready['port']}: {ready['models']} model versions; services:"
                      f" {', '.join(sorted(served))}; seed {rng_seed}", file=sys.stderr)  # fmt: skip
                before = rss_mib(proc.pid)
                tally, slots, stop = Tally(), threading.Semaphore(args.concurrency), threading.Event()
                start = time.perf_counter()
                ticker = threading.Thread(target=progress, args=(tally, args.cases, start, stop), daemon=True)
                ticker.start()
                with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
                    left = args.cases
                    for i, (kind, (_, share)) in enumerate(KINDS.items()):
                        n = left if i == len(KINDS) - 1 else round(args.cases * share)
                        drive(kind, n, channel, served, pool, slots, tally, rng)
                        left -= n
                elapsed = time.perf_counter() - start
                stop.set()
                after = rss_mib(proc.pid)
                try:
                    alive(channel)
                    serving = "SERVING"
                except (AssertionError, grpc.RpcError) as e:
                    serving = f"NOT SERVING ({e!r:.200})"
        finally:
            proc.terminate()
            proc.wait(30)
        logged = logged_tracebacks((Path(tmp) / "server.log").read_text())
    ok = report(tally, elapsed, (before, after), serving)
    print(f"tracebacks in the server's log (not sent to clients): {sum(logged.values()):,}")
    for (where, exception), count in logged.most_common(EXAMPLES * 2):
        print(f"  {count:>6,}  {where[:150]}\n          {exception[:300]}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
