"""Property-based fuzzing of every RPC of every registered service: typed requests, raw bytes, header garbage.

Whatever arrives, the answer is a documented status: OK, INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED or
FAILED_PRECONDITION; UNIMPLEMENTED only for a method the server does not have, DEADLINE_EXCEEDED only for a call
that set a deadline; never INTERNAL or UNKNOWN. A refusal of a ganserve.v1 request names the field it is about,
no message carries a traceback, and afterwards the server still serves. Methods are found from the service
descriptors, so a method added later is fuzzed too. bench/fuzz.py drives the same cases at a server process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings

from service.api.ganserve.v1 import generator_pb2 as pb
from testkit.fuzzcases import (
    GANSERVE,
    LIMITS,
    REQUESTS,
    SERVICES,
    Case,
    alive,
    build_repository,
    call,
    metadata_cases,
    names_a_field,
    open_channel,
    raw_cases,
    served_services,
    typed_cases,
    verdict,
)
from testkit.servefix import running


@dataclass
class Target:
    channel: grpc.Channel
    served: set[str]
    auth: bool = False

    def check(self, case: Case) -> None:
        code, details = call(self.channel, case)
        problem = verdict(case, code, details, self.served, self.auth)
        assert problem is None, f"{problem}: {code.name} {details!r}"


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return build_repository(tmp_path_factory.mktemp("fuzz"))


@contextlib.contextmanager
def serve_in_thread(repo: Path, **flags) -> Iterator[int]:
    """An in-process server on its own event loop in a background thread; yields its port."""
    ready: concurrent.futures.Future = concurrent.futures.Future()

    async def serve() -> None:
        try:
            async with running(repo, **LIMITS, **flags) as (server, _stub, _channel):
                stop = asyncio.Event()
                ready.set_result((server.port, asyncio.get_running_loop(), stop))
                await stop.wait()
        except BaseException as e:
            if not ready.done():
                ready.set_exception(e)
            raise

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    port, loop, stop = ready.result(timeout=60)
    try:
        yield port
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)


@pytest.fixture(scope="module")
def target(repo) -> Iterator[Target]:
    with serve_in_thread(repo) as port, open_channel(port) as channel:
        yield Target(channel, served_services(channel))


TOKEN = "fuzz-admin-token-0123456789"
BEARER = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture(scope="module")
def auth_target(repo, tmp_path_factory) -> Iterator[Target]:
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text(f"ops admin {TOKEN}\n")
    with serve_in_thread(repo, auth_tokens_file=str(tokens)) as port, open_channel(port) as channel:
        yield Target(channel, served_services(channel, BEARER), auth=True)


FUZZ = settings(
    deadline=None,
    derandomize=True,  # the same examples on every run, so that CI is reproducible
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


def examples(full: int) -> int:
    """A test's share of its `full` count of cases, as the Hypothesis profile says (tests/conftest.py): all of them
    under HYPOTHESIS_PROFILE=thorough, 2/5 under the default. bench/fuzz.py draws tens of thousands."""
    return max(1, full * settings.default.max_examples // settings.get_profile("thorough").max_examples)


def test_typed_requests_to_every_rpc(target):
    @settings(FUZZ, max_examples=examples(500))
    @given(typed_cases())
    def one(case: Case) -> None:
        target.check(case)

    one()
    alive(target.channel)


def test_random_and_mutated_bytes_to_every_method(target):
    @settings(FUZZ, max_examples=examples(500))
    @given(raw_cases())
    def one(case: Case) -> None:
        target.check(case)

    one()
    alive(target.channel)


def test_header_garbage(target):
    @settings(FUZZ, max_examples=examples(200))
    @given(metadata_cases())
    def one(case: Case) -> None:
        target.check(case)

    one()
    alive(target.channel)


def test_header_garbage_with_tokens_on(auth_target):
    """Every header the client can send, `authorization` above all, gets a refusal or an answer; never a crash."""

    @settings(FUZZ, max_examples=examples(150))
    @given(metadata_cases(also=BEARER))
    def one(case: Case) -> None:
        auth_target.check(case)

    one()
    alive(auth_target.channel, BEARER)


def test_every_served_method_is_fuzzed(target):
    """The server has every service fuzzed here and no other: a service registered later fails this until it is."""
    assert target.served == {s.full_name for s in SERVICES}
    assert {"/ganserve.v1.Generator/Generate", "/ganserve.v1.ModelAdmin/UnloadModel"} <= {p for p, _ in GANSERVE}
    assert all(m.input_type.full_name in REQUESTS for _, m in GANSERVE)


@pytest.mark.parametrize(
    ("details", "request_type", "ok"),
    [
        ("seeds.seeds[3]: a seed is an integer", pb.GenerateRequest, True),
        ("labels[0].index: unknown class 7", pb.GenerateRequest, True),
        ("latents: give seeds, seed_range or rows", pb.GenerateRequest, True),
        ("keyframes[1].row.values: latents must be finite", pb.InterpolateRequest, True),
        ("keyframes.label: give a label for every keyframe", pb.InterpolateRequest, True),
        ("request: cannot parse", pb.ListModelsRequest, True),
        ("name: no model named 'x'", pb.GetModelRequest, True),
        ("model: no model named 'x'", pb.GetModelRequest, False),
        ("version: model 'plain' has no version 9", pb.GetModelRequest, True),
        ("keyframes[1].row.values: x", pb.GenerateRequest, False),
        ("seeds.nope: x", pb.GenerateRequest, False),
        ("truncation.x: y", pb.GenerateRequest, False),
        ("latents.seeds: x", pb.GenerateRequest, False),
        ("Seeds: x", pb.GenerateRequest, False),
        ("internal error", pb.GenerateRequest, False),
        ("", pb.GenerateRequest, False),
    ],
)
def test_field_names_are_checked_against_the_request_type(details, request_type, ok):
    assert names_a_field(details, request_type.DESCRIPTOR) is ok
