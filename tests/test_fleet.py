"""Three replicas reading one S3 model repository, behind Envoy and behind the client's own round_robin, proven
under a closed-loop load of mixed calls (issue 25).

One fleet for the module, on loopback: SeaweedFS with the shipped model published (testkit/seaweed.py), three
`python -m service` replicas polling it every second, and Envoy from deploy/envoy/envoy.yaml with only its addresses
rewritten (testkit/fleet.py). The tests run in order against it; each keeps six callers busy with Generate,
GenerateStream, Interpolate and OIP ModelInfer, and each asserts that not one call failed. Which replica answered is
read from each replica's own /metrics; which version answered is in every response. The replicas send their traces
to an OTLP receiver in this process (testkit/otlp.py), for the calls their callers sampled. Every test prints its
figures (`make fleet-test` shows them; README.md, "Fleet", records a run).
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from service.api.ganserve.v1 import generator_pb2 as pb
from service.api.ganserve.v1 import generator_pb2_grpc as pb_grpc
from service.client import Client
from testkit.fleet import Envoy, Load, Replica, served, shares, start_replicas
from testkit.load import Tally
from testkit.otlp import ThreadedCollector
from testkit.process import ROOT, shipped_version
from testkit.seaweed import SeaweedFS

MODEL, CLASSES = "mnist-cdcgan", 10
REPLICAS, CALLERS = 3, 6
POLL_S = 1.0
PHASE_S = 5.0  # load per balance check
OUTAGE_S = 30.0
TRACED_CALLS = 60
GRACE_S = 10.0
# Each replica's share of the calls. A third each is fair; least-request (Envoy) and round_robin (the client) both
# aim for it, and on two cores that three replicas, Envoy and the callers share, one replica may be starved of CPU
# for a while: 20% to 47% allows that and still fails a replica left out, or one taking half the calls.
FAIR = (0.20, 0.47)
# Publish → every replica serves the new version: the next poll (at most POLL_S), then listing, download, load and
# warm-up of a 3 MB model on a busy 2-core machine. Measured: about 1.5 s (README.md, "Fleet").
SWITCH_S = POLL_S + 6.0


@dataclass
class Fleet:
    store: SeaweedFS
    replicas: list[Replica]
    envoy: Envoy
    model_file: Path
    shipped: int
    traces: ThreadedCollector


def report(phase: str, **figures) -> None:
    print(f"fleet {phase}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


def summary(tally: Tally) -> dict:
    return {
        "calls": len(tally.calls),
        "failed": len(tally.failures()),
        "by_method": dict(Counter(c.method for c in tally.calls)),
    }


def assert_no_failures(tally: Tally) -> None:
    failed = tally.failures()
    assert not failed, f"{len(failed)} of {len(tally.calls)} calls failed: {tally.counts()}; first: {failed[:3]}"
    assert len({c.method for c in tally.calls}) == 4, "the load did not mix all four methods"


def wait_versions(replicas: list[Replica], done, since: float, timeout: float) -> list[float]:
    """Seconds from `since` until each replica's served versions satisfy `done(versions)`, read from its /metrics."""
    times: list[float | None] = [None] * len(replicas)
    end = since + timeout
    while None in times:
        for i, r in enumerate(replicas):
            if times[i] is None and done(r.versions(MODEL)):
                times[i] = round(time.monotonic() - since, 2)
        if time.monotonic() > end:
            logs = "".join(
                f"\n--- {r.name}\n{r.log_tail(1500)}" for r, t in zip(replicas, times, strict=True) if t is None
            )
            raise AssertionError(f"not every replica switched within {timeout} s: {times}{logs}")
        time.sleep(0.05)
    return times


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    shipped = shipped_version(MODEL)
    model_file = ROOT / "models" / MODEL / str(shipped) / "model.onnx"
    traces = ThreadedCollector()
    # Spans only for calls whose caller sampled them (the traced test's), sent within 0.1 s.
    tracing = traces.env | {"OTEL_TRACES_SAMPLER": "parentbased_always_off", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    with SeaweedFS(root / "store") as store:
        store.publish(model_file, MODEL, shipped)
        args = ["--model-repository", f"s3://{store.bucket}", "--model-control", "poll", "--poll-seconds",
                str(POLL_S), "--preferred-batch-size", "4", "--grace-seconds", str(GRACE_S)]  # fmt: skip
        replicas = start_replicas(REPLICAS, args, store.env | tracing, root)
        try:
            with Envoy([r.address for r in replicas], root) as envoy:
                yield Fleet(store, replicas, envoy, model_file, shipped, traces)
        finally:
            for r in replicas:
                r.stop()
            traces.close()


@pytest.fixture(scope="module")
def through_envoy(fleet):
    with grpc.insecure_channel(fleet.envoy.address) as channel:
        yield channel


@pytest.fixture(scope="module")
def round_robin(fleet):
    """The client library over the three addresses: its own round_robin, no proxy."""
    with Client("ipv4:" + ",".join(r.address for r in fleet.replicas)) as client:
        yield client.channel


def balance(fleet: Fleet, channel: grpc.Channel, phase: str) -> None:
    before = served(fleet.replicas)
    with Load(channel, MODEL, CLASSES, CALLERS) as load:
        time.sleep(PHASE_S)
    share = shares(served(fleet.replicas), before)
    report(phase, **summary(load.tally), shares=[f"{s:.1%}" for s in share])
    assert_no_failures(load.tally)
    assert all(FAIR[0] <= s <= FAIR[1] for s in share), share


def drain(fleet: Fleet, channel: grpc.Channel, phase: str, victim: Replica, channel_is_envoy: bool) -> None:
    """SIGTERM to `victim` mid-load: no call fails, the calls it took finish, and it exits 0 within its grace."""
    before = victim.answered()
    last: list[Counter] = [before]

    def watch() -> None:  # the victim's own count of what it answered, until its metrics port closes
        while victim.proc.poll() is None:
            with contextlib.suppress(OSError):
                last[0] = victim.answered()
            time.sleep(0.05)

    stats = fleet.envoy.stats()
    try:
        with Load(channel, MODEL, CLASSES, CALLERS) as load:
            time.sleep(1.5)
            watcher = threading.Thread(target=watch)
            watcher.start()
            start = time.monotonic()
            victim.terminate()
            exit_code = victim.proc.wait(GRACE_S + 5)
            drained = time.monotonic() - start
            watcher.join()
            time.sleep(1.5)  # and the load goes on without it
    finally:  # back for the next test, where Envoy finds it again
        victim.start()
        fleet.envoy.wait_healthy({victim.address})
    codes = Counter()
    for (_, status), n in (last[0] - before).items():
        codes[status] += n
    figures = {"exit": exit_code, "drain_s": round(drained, 2), "victim_answered": dict(codes)}
    if channel_is_envoy:
        after = fleet.envoy.stats()
        for name in ("upstream_rq_retry", "outlier_detection.ejections_enforced_total"):
            figures[name.rsplit(".", 1)[-1]] = after[name] - stats[name]
    report(phase, **summary(load.tally), **figures)
    assert exit_code == 0 and drained < GRACE_S
    assert_no_failures(load.tally)
    # What the victim took, it finished: besides OK, only calls it refused as it began to drain (UNAVAILABLE before
    # any work, which the balancer sends elsewhere), never a cancelled or broken one.
    assert codes["OK"] > 0 and set(codes) <= {"OK", "UNAVAILABLE"}, codes


def test_envoy_gives_every_replica_a_fair_share(fleet, through_envoy):
    balance(fleet, through_envoy, "envoy balance")


def test_the_callers_trace_id_reaches_the_replica_that_served_each_call(fleet, through_envoy):
    """W3C traceparent through Envoy: each call's trace id is on one span, of the replica that answered it, as a child
    of the caller's span; which replica answered is that replica's own count."""
    stub = pb_grpc.GeneratorStub(through_envoy)
    before, sent = served(fleet.replicas), {}
    for i in range(TRACED_CALLS):
        trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
        request = pb.GenerateRequest(model=MODEL, seeds=pb.SeedList(seeds=[i]), labels=[pb.Label(index=i % CLASSES)])
        stub.Generate(request, metadata=[("traceparent", f"00-{trace_id}-{parent}-01")], timeout=10)
        sent[trace_id] = parent
    answered = [a - b for a, b in zip(served(fleet.replicas), before, strict=True)]

    def ours() -> dict[str, list]:
        found = fleet.traces.spans_by_service()
        return {r.name: [s for s in found.get(r.name, []) if s.trace_id.hex() in sent] for r in fleet.replicas}

    end = time.monotonic() + 10
    while sum(map(len, ours().values())) < len(sent) and time.monotonic() < end:
        time.sleep(0.1)
    spans = ours()
    report("traces", calls=len(sent), spans_by_replica=[len(spans[r.name]) for r in fleet.replicas], answered=answered)
    traced = Counter(s.trace_id.hex() for found in spans.values() for s in found)
    assert traced == Counter(sent.keys())  # every call once, none twice
    assert all(s.parent_span_id.hex() == sent[s.trace_id.hex()] for found in spans.values() for s in found)
    assert [len(spans[r.name]) for r in fleet.replicas] == answered
    assert sum(n > 0 for n in answered) >= 2  # the calls were spread, so the trace followed each one


def test_a_published_version_reaches_every_replica_and_a_rollback_fails_no_call(fleet, through_envoy):
    new = fleet.shipped + 1
    with Load(through_envoy, MODEL, CLASSES, CALLERS) as load:
        time.sleep(1)
        published = time.monotonic()
        fleet.store.publish(fleet.model_file, MODEL, new)
        forward = wait_versions(fleet.replicas, lambda v: new in v, published, SWITCH_S)
        everywhere = time.monotonic()
        time.sleep(1)
        removed = time.monotonic()
        fleet.store.remove(MODEL, new)
        back = wait_versions(fleet.replicas, lambda v: v == {fleet.shipped}, removed, SWITCH_S)
        rolled_back = time.monotonic()
        time.sleep(1)
    calls = load.tally.calls
    first_new = min(c.end for c in calls if c.version == new) - published
    first_back = min(c.end for c in calls if c.version == fleet.shipped and c.start >= removed) - removed
    report("publish and roll back", **summary(load.tally), switch_s=forward, rollback_s=back,
           first_answer_s=round(first_new, 2), first_rolled_back_answer_s=round(first_back, 2))  # fmt: skip
    assert_no_failures(load.tally)
    assert {c.version for c in calls} == {fleet.shipped, new}
    # Every response names its version, and it is the right one: the new version from the moment every replica
    # serves it until it is removed, the shipped one outside that.
    assert all(c.version == new for c in calls if everywhere <= c.start and c.end < removed)
    assert all(c.version == fleet.shipped for c in calls if c.end < published or c.start >= rolled_back)


def test_sigterm_to_a_replica_behind_envoy_fails_no_call(fleet, through_envoy):
    drain(fleet, through_envoy, "envoy drain", fleet.replicas[0], channel_is_envoy=True)


def test_the_store_stopped_for_30_s_fails_no_call_and_a_later_version_is_served(fleet, through_envoy):
    new = fleet.shipped + 2
    with Load(through_envoy, MODEL, CLASSES, CALLERS) as load:
        time.sleep(1)
        fleet.store.stop()
        stopped = time.monotonic()
        time.sleep(OUTAGE_S)
        fleet.store.start()
        back = time.monotonic()
        fleet.store.publish(fleet.model_file, MODEL, new)
        published = time.monotonic()
        switch = wait_versions(fleet.replicas, lambda v: new in v, published, SWITCH_S)
        time.sleep(1)
    during = [c for c in load.tally.calls if stopped <= c.start and c.end < back]
    report("store outage", **summary(load.tally), during_outage=len(during), outage_s=round(back - stopped, 1),
           switch_s=switch)  # fmt: skip
    assert_no_failures(load.tally)
    assert during and all(c.version == fleet.shipped for c in during)


def test_round_robin_gives_every_replica_a_fair_share(fleet, round_robin):
    balance(fleet, round_robin, "round_robin balance")


def test_sigterm_to_a_replica_under_round_robin_fails_no_call(fleet, round_robin):
    drain(fleet, round_robin, "round_robin drain", fleet.replicas[1], channel_is_envoy=False)
