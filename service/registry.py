"""The model lifecycle: which versions serve, and how they join and leave without failing a request.

The promise (README, "Model lifecycle"):
- a version is loaded, validated and warmed off the event loop, and joins only when ready;
- a failed load changes nothing that serves: one log line, a counter, and the reason in the index;
- a version that leaves stops taking requests at once; what it already took finishes, then its session is freed;
- the last ready version of a model is never dropped because its replacement failed;
- lifecycle work is serialised, and triggers that arrive meanwhile share the next pass.

The serving map is replaced whole, never changed in place, so a request always sees one consistent set.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service import encode, profiles
from service.batcher import NORMAL, Batcher, Timing, choose_batch_size
from service.config import BatchingConfig, ModelControl, RuntimeConfig
from service.contract import ContractError, ModelSpec, file_sha256, read_spec
from service.domain import VersionStatus
from service.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable, short
from service.metrics import Metrics
from service.objectstore import StoreUnavailable
from service.repository import ENCODER_FILE, NAME, ModelDir, Repository, Stamp, VersionPolicy
from service.runtime import EncoderSession, Session, usable_cores

log = logging.getLogger(__name__)

# The longest a piece of a split request should run: a small request arriving behind a big one waits about this
# long (bench/README.md, "Fairness": pieces of 32 DCGAN images, ~4 ms, cut a 1-image p99 beside 1,024-image
# requests from 56 to 20 ms at the same throughput; pieces of 128 images ran ~17 ms).
PIECE_SECONDS = 0.005
# After a pass that could not reach the store, the next is tried this long after, doubling up to RETRY_MAX.
RETRY_FIRST, RETRY_MAX = 1.0, 30.0
STORE_WIDE = ("unreachable", "denied", "no_bucket")  # StoreUnavailable kinds that no other object would escape
LOADS = itertools.count()  # every version loaded gets the next number: a reload is never the same version twice
AVAILABLE, LOADING, READY, UNLOADING, FAILED = "AVAILABLE", "LOADING", "READY", "UNLOADING", "FAILED"


def _as_is(path: str) -> str:
    return path


def served_spec(session: Session) -> ModelSpec:
    """The file's spec, checked against its graph and against what this server serves."""
    spec = read_spec(session.session)
    if spec.kind != "image":
        raise ContractError(f"kind: {spec.kind!r} generators are not served; this server serves image generators")
    return spec


@dataclass(eq=False)
class ModelVersion:
    name: str
    version: int
    session: Session
    spec: ModelSpec
    batcher: Batcher
    encoder: EncoderSession | None = None  # Invert serves this version only with one
    note: str = ""  # why its encoder.onnx was refused (RepositoryIndex says it while READY)
    users: int = 0  # requests holding it (Registry.use)
    load: int = field(default_factory=lambda: next(LOADS))  # which load of the file this is (a cache key part)
    _released: asyncio.Event | None = None

    async def run(
        self, z: np.ndarray, y: np.ndarray | None, deadline: float | None, priority: int = NORMAL,
        admitted: bool = False, pixels: bool = False, trace: list[Timing] | None = None,
    ) -> np.ndarray:  # fmt: skip
        """The model's output for z (and y); with `pixels`, as uint8 images [n, H, W, C] (encode.to_uint8); with
        `trace`, the batcher's timings of it (Batcher.submit)."""
        feeds = {"z": z} if y is None else {"z": z, "y": y}
        return await self.batcher.submit(feeds, deadline, priority, admitted, pixels, trace)

    async def released(self) -> None:
        """Returns once no request holds this version."""
        if self.users:
            self._released = self._released or asyncio.Event()
            await self._released.wait()

    def _release(self) -> None:
        self.users -= 1
        if not self.users and self._released is not None:
            self._released.set()


@dataclass
class _Asked:
    """What the admin API (or --load-model) said about one model; it outlives rescans."""

    load: bool  # False: UnloadModel of the whole model
    pinned: set[int] = field(default_factory=set)  # LoadModel of a version: served beside the policy's
    dropped: set[int] = field(default_factory=set)  # UnloadModel of a version


class Registry:
    def __init__(
        self,
        repository: Repository,
        control: ModelControl,
        runtime: RuntimeConfig,
        batching: BatchingConfig,
        metrics: Metrics | None = None,
        on_change: Callable[[], None] = lambda: None,
        grace: float = 25.0,
        session_factory: Callable[[Path, RuntimeConfig], Session] = Session,
    ):
        self.repository, self.control, self.runtime, self.batching = repository, control, runtime, batching
        self.session_factory = session_factory  # how a version's file becomes a Session (tests inject fakes)
        self.policy = VersionPolicy.parse(control.version_policy, "version_policy")
        self.metrics, self._on_change, self.grace = metrics, on_change, grace  # grace: the longest a drain waits
        self._serving: dict[str, dict[int, ModelVersion]] = {}  # replaced whole, never changed in place
        self._disk: dict[str, ModelDir] = {}  # as of the last scan
        self._failed: dict[tuple[str, int], tuple[Stamp, str]] = {}  # tried again once the file changes
        self._loading: tuple[str, int] | None = None
        self._retiring: dict[ModelVersion, tuple[str, asyncio.Task]] = {}  # → why it left, its drain
        self._skipped: set[str] = set()  # what the scan skipped and a warning already named
        self._outage = 0  # passes in a row that could not reach the store
        self._store_failure: StoreUnavailable | None = None  # what the last of them met
        self._retry: asyncio.TimerHandle | None = None
        self._asked = {name: _Asked(load=True) for name in control.load_model}
        self._next: asyncio.Future[int] | None = None  # the pass the next trigger joins
        self._runner: asyncio.Task | None = None
        self._closing = False

    # ---- what serves -------------------------------------------------------------------------------

    @property
    def models(self) -> dict[str, dict[int, ModelVersion]]:
        """The serving versions by name and version: a snapshot, never changed afterwards."""
        return self._serving

    @property
    def ready(self) -> bool:
        return any(self._serving.values())

    def versions(self, name: str) -> list[int]:
        """Serving versions of `name`, ascending (empty when none)."""
        return sorted(self._serving.get(name, ()))

    def get(self, name: str, version: int = 0, names: Callable[[str], str] = _as_is) -> ModelVersion:
        """A version (0 = the latest serving); NotFound names what is there instead, and the request's fields in the
        caller's words (`names`: the data plane's field → the caller's)."""
        versions = self._serving.get(name)
        if not versions:
            known = ", ".join(sorted(self._serving)) or "none loaded"
            raise NotFound(f"{names('model')}: no model named {short(name)} (models: {known})")
        if version == 0:
            return versions[max(versions)]
        if version not in versions:
            raise NotFound(
                f"{names('version')}: model {name!r} has no version {version} (versions: {sorted(versions)})"
            )
        return versions[version]

    @contextlib.contextmanager
    def use(self, name: str, version: int = 0, names: Callable[[str], str] = _as_is) -> Iterator[ModelVersion]:
        """A version held for one request: if it leaves meanwhile, its session stays until the request is done."""
        mv = self.get(name, version, names)
        mv.users += 1
        try:
            yield mv
        finally:
            mv._release()

    # ---- triggers ----------------------------------------------------------------------------------

    async def sync(self) -> int:
        """Rescan the repository and apply it; returns how many versions joined.

        A call that arrives while a pass runs is served by the next pass, which every such call shares: twenty
        SIGHUPs make at most two passes, and each version loads once.
        """
        if self._closing:
            raise Unavailable("model repository: the server is stopping")
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
            if self._runner is None:
                self._runner = asyncio.ensure_future(self._passes())
        return await asyncio.shield(self._next)

    async def _passes(self) -> None:
        try:
            while self._next is not None and not self._closing:
                done, self._next = self._next, None
                try:
                    done.set_result(await self._pass())
                except Exception as e:  # handed to every caller that asked for this pass
                    done.set_exception(e)
        finally:
            self._runner = None
            if self._next is not None:  # stopping: nobody waits for nothing
                self._next.set_exception(Unavailable("model repository: the server is stopping"))
                self._next = None

    async def load_model(self, name: str, version: int = 0) -> list[VersionStatus]:
        """LoadModel: serve `name` (by its policy), or also `version` of it; fails if what it asked for fails."""
        if not NAME.fullmatch(name):
            raise InvalidArgument(f"name: {short(name)} is not a model name (letters, digits, '.', '_', '-')")
        found, _ = await asyncio.to_thread(self.repository.scan)
        if name not in found:
            raise NotFound(f"name: no model {name!r} in the repository (models: {', '.join(sorted(found)) or 'none'})")
        if version and version not in found[name].files:
            on_disk = sorted(found[name].files)
            raise NotFound(f"version: model {name!r} has no version {version} on disk (versions: {on_disk})")
        before = self._asked.get(name)
        asked = self._asked[name] = _Asked(True, set(before.pinned), set(before.dropped)) if before else _Asked(True)
        if version:
            asked.pinned.add(version)
            asked.dropped.discard(version)
        else:
            asked.dropped.clear()
        await self.sync()
        status = self.status(name)
        failed = [s for s in status if s.state == FAILED and (s.version == version or not version)]
        if version in {s.version for s in failed} or (not version and failed and not self.versions(name)):
            # What it asked for did not load: as if it had not asked (a later fix of the file loads nothing unasked).
            if self._asked.get(name) is asked and before is None:
                del self._asked[name]
            elif self._asked.get(name) is asked:
                self._asked[name] = before
            raise FailedPrecondition(
                "name: " + "; ".join(f"model {name!r} version {s.version} failed to load: {s.reason}" for s in failed)
            )
        missing = version not in self.versions(name) if version else not self.versions(name)
        if missing and self._store_failure is not None:  # the store, not the file: asked, and retried by itself
            raise Unavailable(f"name: model {name!r} cannot be loaded now: {self._store_failure}")
        return status

    async def unload_model(self, name: str, version: int = 0) -> list[VersionStatus]:
        """UnloadModel: stop serving `name`, or one version of it; answers once it takes no new requests."""
        serving = self._serving.get(name, {})
        if not serving and (version or name not in self._disk):
            raise NotFound(f"name: model {short(name)} is not loaded (models: {', '.join(sorted(self._serving))})")
        asked = self._asked.setdefault(name, _Asked(load=True))
        if version:
            if version not in serving:
                versions = sorted(serving)
                raise NotFound(f"version: model {name!r} has no version {version} serving (versions: {versions})")
            asked.dropped.add(version)
            asked.pinned.discard(version)
        else:
            self._asked[name] = _Asked(load=False)
        await self.sync()
        return self.status(name)

    # ---- one pass ----------------------------------------------------------------------------------

    async def _pass(self) -> int:
        try:
            found, skipped = await asyncio.to_thread(self.repository.scan)
        except StoreUnavailable as e:  # nothing is known to have changed: everything serving goes on
            self._unreachable(e)
            return 0
        for name in sorted(set(skipped) - self._skipped):
            log.warning("model repository: skipping %s: %s", short(name), skipped[name])
        self._skipped = set(skipped)
        # A folder that could not be listed this time keeps what was known of it, with the reason.
        for name, model in found.items():
            if not model.readable and name in self._disk:
                found[name] = dataclasses.replace(self._disk[name], error=model.error)
        self._disk = found
        self._failed = {k: v for k, v in self._failed.items() if self._still_failing(*k)}
        self._leave(replaced=False)  # unloaded and deleted versions first: they must not wait for loads
        joined = 0
        # Newest first, one at a time; a failure drops out of the policy's choice, and the next pass over the
        # wanted set picks the version after it (latest:1 with a corrupt v3 serves v2).
        store_failure, postponed = None, set()
        while not self._closing:
            live = self._serving
            missing = [(n, v) for n in found for v in sorted(self._wanted(n), reverse=True)
                       if v not in live.get(n, {}) and (n, v) not in postponed]  # fmt: skip
            if not missing:
                break
            try:
                joined += await self._load(*missing[0])
            except StoreUnavailable as e:  # not the version's fault: tried again after a backoff, not marked failed
                store_failure = store_failure or e
                if e.kind in STORE_WIDE:  # nothing else would download either
                    break
                postponed.add(missing[0])  # this object only: the others load meanwhile
        if store_failure is not None:  # a version that leaves for one postponed waits for the retry
            self._unreachable(store_failure)
            self._on_change()
            return joined
        self._reachable()
        self._leave(replaced=True)
        self._on_change()
        return joined

    def _unreachable(self, e: StoreUnavailable) -> None:
        """One line when an outage starts (not one per retry), a count per failed pass, and a retry after a backoff."""
        self._outage, self._store_failure = self._outage + 1, e
        if self.metrics is not None:
            self.metrics.repository_errors.labels(e.kind).inc()
        if self._outage == 1:
            log.error("model repository %s; serving what is loaded, and retrying", e)
        if self._retry is None and not self._closing:
            delay = min(RETRY_MAX, RETRY_FIRST * 2 ** (self._outage - 1))
            self._retry = asyncio.get_running_loop().call_later(delay, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        if not self._closing:
            task = asyncio.ensure_future(self.sync())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # a failure is logged by the pass

    def _reachable(self) -> None:
        if self._outage:
            log.info("model repository %s answers again after %d failed pass(es)", self.repository, self._outage)
        self._outage, self._store_failure = 0, None

    def _leave(self, replaced: bool) -> None:
        """Retire serving versions that are no longer wanted, availability first. One that is merely outside the
        policy leaves only once a version the policy wants is ready (`replaced`), and then only if one is. One that
        was unloaded or deleted while another version is to replace it (a rollback: latest:1 with the newest
        unloaded) leaves once the pass has loaded that one, so that the model is never without a version; with
        nothing to replace it, it leaves at once."""
        for name in list(self._serving):
            wanted = self._wanted(name)
            ready = any(v in wanted for v in self._serving[name])
            for version in self.versions(name):
                why = self._why_not(name, version)
                if version in wanted or (why.startswith("outside") and not (replaced and ready)):
                    continue
                if not replaced and wanted and not ready:  # its replacement loads in this pass
                    continue
                self._retire(self._serving[name][version], why)

    def _wanted(self, name: str) -> set[int]:
        """The versions of `name` that should serve, of those on disk that did not fail as they are now."""
        model = self._disk.get(name)
        asked = self._asked.get(name)
        if model is None or not (asked.load if asked else self.control.mode != "explicit"):
            return set()
        if model.error:  # an unusable model.json changes nothing: what serves goes on serving
            return set(self.versions(name))
        candidates = {v for v in model.files if not self._still_failing(name, v)}
        if asked is None:
            return (model.policy or self.policy).select(candidates)
        candidates -= asked.dropped  # latest:1 with the newest unloaded serves the one before it
        return (model.policy or self.policy).select(candidates) | (asked.pinned & candidates)

    def _still_failing(self, name: str, version: int) -> bool:
        failure = self._failed.get((name, version))
        model = self._disk.get(name)
        return failure is not None and model is not None and model.stamps.get(version) == failure[0]

    def _why_not(self, name: str, version: int) -> str:
        """Why a version on disk does not serve."""
        model, asked = self._disk.get(name), self._asked.get(name)
        if model is None or version not in model.files:
            return "deleted from the repository"
        if asked is not None and (not asked.load or version in asked.dropped):
            return "unloaded by UnloadModel"
        if asked is None and self.control.mode == "explicit":
            return "not loaded: explicit model control (LoadModel or --load-model loads it)"
        if model.error:
            return model.error
        return f"outside version policy {model.policy or self.policy}"

    async def _load(self, name: str, version: int) -> int:
        """Load, validate and warm one version off the event loop; it joins only if all of that worked."""
        model = self._disk[name]
        stamp = model.stamps[version]
        self._loading = (name, version)
        start = time.perf_counter()
        try:
            # Off the event loop: serving goes on meanwhile. A thread cannot be interrupted, so a stop waits for it.
            mv = await asyncio.get_running_loop().run_in_executor(None, self._open, model, version)
        except StoreUnavailable:  # not the version's fault: it is tried again, not marked failed
            raise
        except Exception as e:  # a corrupt file, wrong metadata, an ORT error, a file still being copied
            # Bounded, and without the server's own paths: it reaches RepositoryIndex and LoadModel's answer.
            reason = (str(e).splitlines() or [type(e).__name__])[0].replace(f"{self.repository}{os.sep}", "")[:300]
            self._failed[(name, version)] = (stamp, reason)
            self._count(name, "failure", start)
            log.error("model %s version %d failed to load (%s): %s", name, version, model.files[version], reason)
            return 0
        finally:
            self._loading = None
        if self._closing:  # the stop came during the load: it never joins, and there is nothing to drain
            return 0
        await mv.batcher.start()
        self._serving = {**self._serving, name: {**self._serving.get(name, {}), version: mv}}
        self._count(name, "success", start)
        if self.metrics is not None:
            self.metrics.model_info.labels(name, str(version), mv.session.provider).set(1)
        log.info("model %s version %d ready on %s", name, version, mv.session.provider)
        return 1

    def _open(self, model: ModelDir, version: int) -> ModelVersion:
        name, path = model.name, self.repository.fetch(model, version)
        session = self.session_factory(path, self.runtime)
        spec = served_spec(session)
        cfg = self.batching
        cache, entry = self._profile_entry(session, path)
        cached = profiles.load(cache, entry)
        measure = not (cfg.preferred_batch_size or cached)
        # Every size runs once whatever happens: no request pays for a shape's first run.
        timings = session.warm_up(cfg.max_batch_size, spec.latent_dim, spec.num_classes, measure) or cached or {}
        if measure:
            profiles.save(cache, entry, timings)
        how = "as set" if cfg.preferred_batch_size else "cached" if cached else "measured"
        size = cfg.preferred_batch_size or choose_batch_size(timings)
        workers = cfg.workers or session.concurrent_runs or (2 if session.on_gpu else usable_cores())
        observer = self.metrics.observer(name, version) if self.metrics is not None else None
        # Pieces of big requests that run within PIECE_SECONDS, so that a small request never waits long behind one.
        piece = max((n for n, t in timings.items() if t <= PIECE_SECONDS), default=0)
        pixels = functools.partial(encode.to_uint8, output_range=spec.output_range)
        batcher = Batcher(session.run, dataclasses.replace(cfg, workers=workers), observer, batch_size=size,
                          max_piece=piece, pixels=pixels)  # fmt: skip
        if timings:
            how += ", µs per sample by size: " + ", ".join(f"{n}: {t / n * 1e6:.0f}" for n, t in timings.items())
        log.info("model %s version %d: batches of %d (%s), %d workers", name, version, size, how, workers)
        encoder, note = self._encoder(model, version, path, spec)
        return ModelVersion(name, version, session, spec, batcher, encoder, note)

    def _encoder(self, model: ModelDir, version: int, path: Path, spec: ModelSpec) -> tuple[EncoderSession | None, str]:
        """The encoder.onnx beside model.onnx, if there is one and it was made for this very file; else None and,
        for one that is there, why it was refused (the version serves without inversion)."""
        name, file = model.name, self.repository.encoder(model, version, path)
        if file is None:
            return None, ""
        try:
            encoder = EncoderSession(file, self.runtime)
            encoder.spec.check(spec, file_sha256(path))
        except Exception as e:  # an ORT error, wrong metadata, another generator's encoder: all refuse it alike
            reason = (str(e).splitlines() or [type(e).__name__])[0].replace(f"{self.repository}{os.sep}", "")
            note = f"{ENCODER_FILE} refused: {reason}"[:300]
            log.warning("model %s version %d: serving without inversion: %s", name, version, note)
            return None, note
        log.info("model %s version %d: inversion by %s", name, version, ENCODER_FILE)
        return encoder, ""

    def _profile_entry(self, session: Session, path: Path) -> tuple[Path | None, str]:
        """Where this version's batch-size profile is cached, and under what name (None: no cache, or the size is
        set by --preferred-batch-size)."""
        cfg, rt = self.batching, self.runtime
        cache = None if cfg.preferred_batch_size else profiles.directory(cfg.profile_cache)
        if cache is None:
            return None, ""
        threads = [rt.intra_op_threads, rt.inter_op_threads]
        facts = {"provider": session.provider, "options": rt.provider_options, "cuda_graph": rt.cuda_graph,
                 "threads": threads, "max_batch": cfg.max_batch_size}  # fmt: skip
        return cache, profiles.key(path, facts)

    def _count(self, name: str, result: str, start: float) -> None:
        if self.metrics is not None:
            self.metrics.model_loads.labels(name, result).inc()
            self.metrics.model_load_seconds.labels(name).observe(time.perf_counter() - start)

    def _retire(self, mv: ModelVersion, why: str) -> None:
        """Out of the serving map now (new requests get NOT_FOUND); drained and freed in the background."""
        rest = {v: m for v, m in self._serving[mv.name].items() if m is not mv}
        self._serving = {n: vs for n, vs in {**self._serving, mv.name: rest}.items() if vs}
        if self.metrics is not None:
            self.metrics.version_left(mv.name, mv.version, mv.session.provider)
        log.info("model %s version %d leaves (%s); %d request(s) in flight finish first", mv.name, mv.version, why,
                 mv.users)  # fmt: skip
        task = asyncio.ensure_future(self._drain(mv))
        self._retiring[mv] = (why, task)
        task.add_done_callback(lambda _: self._retiring.pop(mv, None))

    async def _drain(self, mv: ModelVersion, forget: bool = True) -> None:
        """Wait for the requests it holds, at most the grace period (a client that stops reading a stream must not
        pin a session for ever), then stop its batcher: queued work runs, later work gets UNAVAILABLE."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(mv.released(), self.grace)
        await mv.batcher.stop()
        if forget and mv.version not in self._serving.get(mv.name, {}):  # a local copy of it is of no more use
            await asyncio.to_thread(self.repository.forget, mv.name, mv.version)
        log.info("model %s version %d unloaded", mv.name, mv.version)

    # ---- state -------------------------------------------------------------------------------------

    def status(self, name: str | None = None) -> list[VersionStatus]:
        """Every version on disk (as of the last scan) or loaded, with its state, by name and version."""
        keys = {(n, v) for n, model in self._disk.items() for v in model.files}
        leaving = {(mv.name, mv.version): why for mv, (why, _) in self._retiring.items()}
        keys |= {(n, v) for n, vs in self._serving.items() for v in vs} | set(leaving)
        out = []
        for n, v in sorted(k for k in keys if name is None or k[0] == name):
            if v in self._serving.get(n, {}):
                note = self._serving[n][v].note
                out.append(VersionStatus(n, v, READY, f"serving without inversion: {note}" if note else ""))
            elif (n, v) in leaving:
                out.append(VersionStatus(n, v, UNLOADING, leaving[n, v]))
            elif self._loading == (n, v):
                out.append(VersionStatus(n, v, LOADING))
            elif self._still_failing(n, v):
                out.append(VersionStatus(n, v, FAILED, self._failed[(n, v)][1]))
            else:
                why = self._why_not(n, v)
                out.append(VersionStatus(n, v, FAILED if why == self._disk[n].error else AVAILABLE, why))
        return out

    async def stop(self) -> None:
        """No more passes; a load under way finishes and is dropped; every version drains, then stops."""
        self._closing = True
        if self._retry is not None:
            self._retry.cancel()
        if self._runner is not None:
            await asyncio.gather(self._runner, return_exceptions=True)
        serving, self._serving = self._serving, {}
        # Their downloads stay (forget=False): the next start opens them without downloading again.
        draining = [self._drain(mv, forget=False) for versions in serving.values() for mv in versions.values()]
        await asyncio.gather(*draining, *(task for _, task in self._retiring.values()))
