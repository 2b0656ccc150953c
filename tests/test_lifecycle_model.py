"""The job's life, model-checked: random sequences of lifecycle events against a real Redis, the
real store and its Lua scripts, the producer's submit path (:class:`producer.Client`) and the
worker's task path (``worker.queue.task._run_chunk`` around :func:`worker.chunks.process_chunk`,
messages taken from the broker queues and acknowledged through kombu itself), with a plain
Python model beside them.  After every step the invariants of a job's life are checked against
what Redis holds:

* counts add up: ``succeeded + errored + cancelled + expired + pending == total`` with nothing
  negative, one result row per succeeded or errored item, and a final job has nothing pending;
* a final job has no message in its backlog, on a broker queue or unacknowledged (other than
  those a killed worker took with it, which only a later delivery can drop) and no ring entry;
* every stored result answers its own item under the job's current incarnation and spec (the
  engine here writes, as the text of each answer, what it was asked: the prompt, the tokens and
  the system prompt), so an answer to a request that was not made is caught;
* every key of a partial (``submitting``) or final job has a TTL; after delete, prune or a TTL
  lapse no key of the job remains;
* no job stays queued or in progress with a pending item that no message (backlog, queue,
  unacknowledged) can run (an item whose message was lost outright only until the fleet's look
  for lost messages has seen its job quiet; that look publishes exactly the items no message or
  result covers), and no job stays ``cancelling`` with nothing running;
* an accepted submit made the job it was asked for (the stored spec has its mode, priority,
  chunk size and parameters), a final job stays final (``genq retry`` may reopen a completed
  one only), and a message is in one place at a time;
* a job's messages wait only where a worker that may run them takes them (a pinned job's on its
  mode's queue, an ``any`` job's on a queue of its level), and a ring holds a job only under its
  current incarnation, in its own queue's ring (an entry of an older incarnation is dropped by the
  dispatch that meets it, as a message of one is by the worker that takes it).

The events: submits (whole, interrupted at a random page of inputs or chunk of the publish,
resumed, with changed options, ids reused after delete), cancel, retry, delete, prune, expiry
through a controllable clock (``expire_if_due(now=...)``), TTL lapse (every key with a TTL
deleted, as Redis would), deliveries, worker deaths mid-chunk (the process stops at that point:
no store call after it, no acknowledgement), the sweep that returns a dead worker's messages,
messages lost outright (taken off a queue and never recorded as unacknowledged) and the fleet's
look for them, heartbeats, and engine errors that ``genq retry`` runs again.

The engine is the one part not shipped: :class:`AnswerEngine` answers each item with a text
that names the request (generation itself is tested elsewhere, on the tiny model), which is what
lets every result be checked against the model and keeps 100,000 steps affordable.

CI runs a bounded, derandomized walk; ``GENQ_MBT_STEPS=100000`` (``scripts/lifecycle-model.sh``)
runs a long one.  Each failure the walk found is replayed below as a plain test.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

import producer.submit
from producer.client import Client
from tests.helpers import RedisServer
from worker.core.errors import GenqError, JobConflict, JobNotFound, ShutdownRequested
from worker.core.schema import ChunkRef, ErrorInfo, GenParams, Item, ItemResult, JobSpec, Usage, error_result
from worker.core.settings import Settings
from worker.core.states import ErrorCode, FinishReason, ItemStatus, JobStatus, Mode, Priority, QueueMode
from worker.queue import recovery
from worker.queue import task as worker_task
from worker.queue.messages import job_queues
from worker.queue.routing import queue_name, worker_queues
from worker.queue.task import serve
from worker.runtime import Runtime
from worker.store import RedisStore
from worker.store import blocks as input_blocks
from worker.store.dispatch import ring_entry
from worker.store.keys import all_job_keys, backlog_key, job_key, job_keys, ring_key

PROFILE = "tiny-random"
JOBS = ("a", "b", "c")
"""Job ids are drawn from a few, so ids are reused (after delete, prune, a TTL lapse)."""

QUEUES = [queue_name(PROFILE, m, p) for p in Priority for m in QueueMode]
UNACKED = "unacked"
SYSTEM_PROMPT = "be brief"

STEPS = int(os.environ.get("GENQ_MBT_STEPS") or 0)
"""Steps of the long run (0: the CI budget below)."""
CI_EXAMPLES, CI_STEP_COUNT = 100, 50


IGNORED = set(filter(None, (os.environ.get("GENQ_MBT_IGNORE") or "").split(",")))
"""Checks to leave out (names as in :func:`expect`), to see what else a walk finds while a known
failure is not fixed yet: never set in CI."""


class Broken(AssertionError):
    """A rule of a job's life does not hold (a subclass per check: see :func:`broken`)."""


_BROKEN: dict[str, type[Broken]] = {}


def broken(check: str) -> type[Broken]:
    """The failure of ``check``, a class of its own: hypothesis tells failures apart by their
    type (and where they were raised, here always the same line), so a shrink stays on the check
    that failed instead of wandering to another one."""
    if check not in _BROKEN:
        _BROKEN[check] = type(f"Broken_{check.replace('-', '_')}", (Broken,), {})
    return _BROKEN[check]


def expect(check: str, ok: object, message: object) -> None:
    """Assert one rule of a job's life; ``check`` names it in the failure."""
    if not ok and check not in IGNORED:
        raise broken(check)(f"[{check}] {message}")


class Interrupted(Exception):
    """The submitting process went away here (Ctrl-C, a crash): nothing after it runs."""


class Died(BaseException):
    """The worker process was killed here: no store call, no acknowledgement after it."""


# --- the engine: answers that name their request ------------------------------------------------


def answer_text(prompt: str | None, max_new_tokens: int | None, system_prompt: str | None) -> str:
    """What :class:`AnswerEngine` writes for a request (and what the model expects)."""
    raw = json.dumps([prompt, max_new_tokens, system_prompt])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


class AnswerEngine:
    """Implements :class:`worker.chunks.Engine`: micro-batches of two, results written as they
    come, ``should_stop`` honoured between micro-batches like the real engine.  Items whose id
    says ``flaky`` fail with ``generation_error`` while ``flaky`` is on (``genq retry`` runs them
    again); ``die_after`` kills the process after that many results."""

    def __init__(self, name: str, mode: Mode) -> None:
        self.name = name
        self.mode = mode
        self.flaky = True
        self.die_after: int | None = None
        self.process: DyingStore | None = None

    def generate(
        self,
        items: Sequence[Item],
        *,
        job_params: GenParams | None = None,
        system_prompt: str | None = None,
        on_results: Any = None,
        should_stop: Any = None,
        attempts: int = 1,
    ) -> list[ItemResult]:
        done: list[ItemResult] = []
        for start in range(0, len(items), 2):
            if should_stop is not None and should_stop():
                raise ShutdownRequested("stop asked")
            batch = [self._answer(it, job_params, system_prompt, attempts) for it in items[start : start + 2]]
            if self.die_after is not None and len(done) + len(batch) > self.die_after:
                batch = batch[: self.die_after - len(done)]
                if batch and on_results is not None:
                    on_results(batch)
                assert self.process is not None
                self.process.dead = True
                raise Died()
            if on_results is not None:
                on_results(batch)
            done += batch
        return done

    def _answer(
        self, item: Item, job_params: GenParams | None, system_prompt: str | None, attempts: int
    ) -> ItemResult:
        if self.flaky and "flaky" in item.id:
            info = ErrorInfo(type=ErrorCode.GENERATION_ERROR, message="flaky")
            return error_result(item, info, profile=PROFILE, worker=self.name, attempts=attempts)
        mnt = item.params.max_new_tokens or (job_params.max_new_tokens if job_params else None)
        return ItemResult(
            index=item.index,
            id=item.id,
            line=item.line,
            status=ItemStatus.OK,
            text=answer_text(item.prompt, mnt, system_prompt),
            finish_reason=FinishReason.LENGTH,
            usage=Usage(prompt_tokens=1, completion_tokens=mnt or 1),
            profile=PROFILE,
            mode=self.mode,
            worker=self.name,
            attempts=attempts,
        )


class DyingStore:
    """The store as a worker process that can be killed sees it: once ``dead``, every call raises
    :class:`Died` instead of reaching Redis (a killed process makes no more calls)."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.dead = False

    def __getattr__(self, name: str) -> Any:
        target = getattr(self.store, name)
        if not callable(target):
            return target

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.dead:
                raise Died()
            return target(*args, **kwargs)

        return call


# --- the broker, read as kombu stores it ----------------------------------------------------------


@dataclass
class Message:
    task_id: str
    job_id: str
    inc: str
    indices: list[int]
    routing_key: str
    where: str


def _decode(envelope: dict[str, Any], where: str) -> Message:
    body = envelope["body"]
    if envelope.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body).decode()
    args = json.loads(body)[0]
    ref = args[0]
    rk = envelope.get("properties", {}).get("delivery_info", {}).get("routing_key", "")
    tid = str(envelope["headers"]["id"])
    return Message(tid, ref["job_id"], str(ref.get("inc", "")), list(ref["indices"]), rk, where)


@dataclass
class Snapshot:
    """What Redis holds for the invariants, read in one pipelined round trip."""

    messages: list[Message]
    rings: dict[str, list[tuple[str, str]]]
    """Per queue: the ``(job, incarnation)`` of each entry of its ring."""
    jobs: dict[str, dict[str, str]]
    results: dict[str, dict[str, str]]
    ttls: dict[str, dict[str, int]]
    """Per job: each existing key of the job -> its PTTL (-1: none)."""
    running: dict[str, int]


def snapshot(r: Any) -> Snapshot:
    pipe = r.pipeline(transaction=True)
    for job in JOBS:
        pipe.lrange(backlog_key(job), 0, -1)
    for queue in QUEUES:
        pipe.lrange(queue, 0, -1)
    pipe.hvals(UNACKED)
    for queue in QUEUES:
        pipe.lrange(ring_key(queue), 0, -1)
    for job in JOBS:
        pipe.hgetall(job_key(job))
        pipe.hgetall(job_key(job, "results"))
        pipe.hlen(job_key(job, "running"))
        for key in job_keys(job):
            pipe.pttl(key)
    replies = iter(pipe.execute())
    messages: list[Message] = []
    for job in JOBS:
        messages += [_decode(json.loads(raw), f"backlog:{job}") for raw in next(replies)]
    for queue in QUEUES:
        messages += [_decode(json.loads(raw), queue) for raw in next(replies)]
    messages += [_decode(json.loads(raw)[0], UNACKED) for raw in next(replies)]
    rings = {queue: [ring_entry(e) for e in next(replies)] for queue in QUEUES}
    jobs, results, ttls, running = {}, {}, {}, {}
    for job in JOBS:
        jobs[job], results[job], running[job] = next(replies), next(replies), int(next(replies))
        ttls[job] = {}
        for key in job_keys(job):
            ttl = int(next(replies))
            if ttl != -2:  # -2: no such key
                ttls[job][key] = ttl
    return Snapshot(messages, rings, jobs, results, ttls, running)


# --- the model ------------------------------------------------------------------------------------


@dataclass
class Submitted:
    """What a submit asked for: the records and the options."""

    records: list[dict[str, Any]]
    mode: str
    priority: str
    chunk: int
    mnt: int
    expires: float | None
    skip_invalid: bool
    system_prompt: str | None


@dataclass
class ModelJob:
    incarnation: int = 0
    present: bool = False
    partial: bool = False
    asked: Submitted | None = None
    """The options and records of the job's current incarnation (what its results must answer)."""
    complete: bool = False
    """Its submit finished (else it was ended or is still partial: fewer items may be stored)."""
    final: str | None = None
    """The final status last seen (a final job stays final; retry may reopen ``completed`` only)."""
    lost: set[int] = field(default_factory=set)
    """Items of messages lost outright (:meth:`LifecycleMachine.lose`) that no look for lost
    messages has found yet: the one stall allowed."""

    def gone(self) -> None:
        """The job id has no job now (deleted, pruned, lapsed): its next submit starts afresh."""
        self.present, self.partial, self.complete, self.final = False, False, False, None
        self.lost = set()


@dataclass
class Worker:
    mode: Mode
    name: str
    runtime: Runtime
    engine: AnswerEngine
    restarts: int = 0


@dataclass
class World:
    """The Redis server the machines share (flushed for each example)."""

    url: str = ""
    app: Any = None
    """One Celery app for every example (only its connections are used: building one is slow)."""


WORLD = World()


def opts_strategy() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "n": st.integers(1, 6),
            "chunk": st.sampled_from([1, 2, 3]),
            "mode": st.sampled_from([m.value for m in QueueMode]),
            "priority": st.sampled_from([p.value for p in Priority]),
            "mnt": st.sampled_from([2, 5]),
            "expires": st.sampled_from([None, 1e-3, 1e6]),
            "invalid": st.none() | st.integers(0, 5),
            "flaky": st.none() | st.integers(0, 5),
            "skip_invalid": st.booleans(),
            "system": st.booleans(),
        }
    )


VARIANTS = ("new", "same", "same", "priority", "chunk", "mode", "params", "skip_invalid", "expires")
INTERRUPTS = st.none() | st.tuples(
    st.sampled_from(["input", "publish"]),
    st.integers(0, 5),
    st.sampled_from(["stop", "stop", "cancel", "delete", "lapse", "expire", "deliver"]),
)
"""Where a submit is interrupted (before input k, or after publishing k chunks) and what happens
there: ``stop`` (the process goes away), or another event on the same job while the submit goes
on (a cancel, a delete, its keys' TTL running out, its deadline passing, workers taking chunks)."""


class Producer(Client):
    """The producer, in the middle of whose publish something happens (``meanwhile``: raise
    :class:`Interrupted` to stop the process there)."""

    publish_budget: int | None = None
    meanwhile: Any = None

    def publish(self, spec: JobSpec, chunks: dict[str, list[int]]) -> int:
        if self.publish_budget is None:
            return super().publish(spec, chunks)
        take = dict(list(chunks.items())[: self.publish_budget])
        self.publish_budget -= len(take)
        sent = super().publish(spec, take) if take else 0
        if len(take) < len(chunks):
            self.publish_budget = None
            self.meanwhile()
            sent += super().publish(spec, dict(list(chunks.items())[len(take) :]))
        return sent


def records_for(job: str, incarnation: int, opts: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for k in range(opts["n"]):
        rid = f"{job}{incarnation}-{k}" + ("-flaky" if opts["flaky"] == k else "")
        if opts["invalid"] == k:
            out.append({"id": rid, "params": {"max_new_tokens": 2}})  # no prompt: invalid
        else:
            out.append({"id": rid, "prompt": f"{job} {incarnation} item {k}"})
    return out


def interrupting(records: list[dict[str, Any]], after: int, meanwhile: Any) -> Iterator[dict[str, Any]]:
    for k, record in enumerate(records):
        if k == after:
            meanwhile()
        yield record


class LifecycleMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        import redis

        redis.Redis.from_url(WORLD.url).flushall()
        self.settings = Settings.from_env({"GENQ_BROKER_URL": WORLD.url, "GENQ_LOG_LEVEL": "WARNING"})
        self.client = Producer(WORLD.url, settings=self.settings)
        if WORLD.app is None:
            WORLD.app = self.client.app
        self.client._app = WORLD.app
        self.r = self.client.store.r
        self.model = {job: ModelJob() for job in JOBS}
        self.workers = {m: self._worker(m) for m in (Mode.FP32, Mode.NF4)}
        self.orphans: set[str] = set()
        """Task ids a killed worker took with it: in ``unacked``, then back on a queue after the
        sweep, until a delivery drops or runs them."""
        consumer = self.client.app.connection_for_read(transport_options={"visibility_timeout": 0})
        self.consumer = consumer
        self.channel = consumer.default_channel
        self.clock = 0.0
        self.concurrent = False
        """Something happened to the job while the running submit went on."""
        """Seconds the controllable clock is ahead of the real one (expiry only)."""

    def _worker(self, mode: Mode, restarts: int = 0) -> Worker:
        name = f"w-{mode}-{restarts}"
        runtime = Runtime(self.settings, name=name)
        from worker.core.profiles import load_profile

        runtime.profile = load_profile(PROFILE, self.settings)
        runtime.mode = mode
        engine = AnswerEngine(name, mode)
        runtime.engine = engine  # type: ignore[assignment]
        runtime._store = RedisStore(settings=self.settings)
        serve(runtime, worker_queues(PROFILE, mode))
        runtime.beat()  # a worker's first heartbeat, at its start: it consumes its queues now
        return Worker(mode, name, runtime, engine, restarts)

    def teardown(self) -> None:
        self.consumer.release()
        for store in [self.client.store, *(w.runtime._store for w in self.workers.values())]:
            if store is not None:
                store.r.connection_pool.disconnect()

    # --- submits ---------------------------------------------------------------------------------

    @rule(
        job=st.sampled_from(JOBS),
        variant=st.sampled_from(VARIANTS),
        opts=opts_strategy(),
        interrupt=INTERRUPTS,
    )
    def submit(self, job: str, variant: str, opts: dict[str, Any], interrupt: tuple[str, int] | None) -> None:
        m = self.model[job]
        self._refresh(job)
        prior = m.asked if m.present else None
        if prior is None or variant == "new":
            incarnation = m.incarnation + (0 if m.present else 1)
            asked = Submitted(
                records_for(job, incarnation, opts),
                opts["mode"],
                opts["priority"],
                opts["chunk"],
                opts["mnt"],
                opts["expires"],
                opts["skip_invalid"],
                SYSTEM_PROMPT if opts["system"] else None,
            )
            last = m.asked  # the id's previous incarnation (kept after it went)
            if not m.present and last is not None and variant != "same" and asked.mnt == last.mnt:
                # an id used again asks for another request (unless "same"): generated examples
                # repeat their draws, so left alone the reuse would mostly ask the same thing
                asked.mnt = 7 - asked.mnt  # 2 <-> 5
        else:
            incarnation = m.incarnation
            asked = Submitted(**{**prior.__dict__})
            if variant == "priority":
                asked.priority = opts["priority"]
            elif variant == "chunk":
                asked.chunk = opts["chunk"]
            elif variant == "mode":
                asked.mode = opts["mode"]
            elif variant == "params":
                asked.mnt = opts["mnt"]
            elif variant == "skip_invalid":
                asked.skip_invalid = opts["skip_invalid"]
            elif variant == "expires":
                asked.expires = opts["expires"]
        self._submit(job, incarnation, asked, interrupt)

    def _meanwhile(self, job: str, what: str) -> None:
        """Something happens to ``job`` while its submit runs (see :data:`INTERRUPTS`)."""
        self.concurrent = True
        if what == "stop":
            raise Interrupted(what)
        if what == "cancel":
            with contextlib.suppress(JobNotFound):
                self.client.job(job).cancel()
        elif what == "delete":
            self.client.delete(job)
        elif what == "lapse":
            doomed = [k for k in all_job_keys(job) if self.r.pttl(k) > 0]
            if doomed:
                self.r.delete(*doomed)
        elif what == "expire":
            if self.client.store.expire_if_due(job, now=time.time() + 1e7):
                self.client.withdraw(job)
        else:
            self.deliver("fp32", None)
            self.deliver("nf4", None)

    def _submit(
        self, job: str, incarnation: int, asked: Submitted, interrupt: tuple[str, int, str] | None
    ) -> None:
        m = self.model[job]
        source: Any = list(asked.records)
        self.concurrent = False
        stop = interrupt is not None and interrupt[2] == "stop"
        if interrupt is not None:
            self.client.meanwhile = lambda: self._meanwhile(job, interrupt[2])
            if interrupt[0] == "input":
                source = interrupting(asked.records, interrupt[1], self.client.meanwhile)
            else:
                self.client.publish_budget = interrupt[1]
        before = self._status(job)
        new_incarnation = before is None
        try:
            self.client.submit(
                source,
                profile=PROFILE,
                job_id=job,
                mode=asked.mode,
                chunk_size=asked.chunk,
                params=GenParams(max_new_tokens=asked.mnt),
                system_prompt=asked.system_prompt,
                expires_in=asked.expires,
                skip_invalid=asked.skip_invalid,
                priority=asked.priority,
            )
        except Interrupted:
            after = self._status(job)
            if after is None:
                m.gone()
                return
            if new_incarnation or m.partial:
                expect(
                    "interrupted", after == JobStatus.SUBMITTING, f"an interrupted submit left {job} {after}"
                )
                self._adopt(job, incarnation, asked, partial=True)
            return
        except JobConflict:
            if self.concurrent:
                self._after_concurrent(job, incarnation, asked)
                return
            expect("refused-new", not new_incarnation, f"a submit of new job {job} was refused")
            expect("refused-changed", self._status(job) == before, "a refused submit changed the job")
            return
        except GenqError as exc:
            if self.concurrent and not stop:
                self._after_concurrent(job, incarnation, asked)
                return
            # a bad line without skip_invalid: the submit left nothing
            expect("failed-submit", "line" in str(exc), str(exc))
            expect(
                "failed-submit",
                self._status(job) is None or not new_incarnation,
                f"a failed submit left {job}",
            )
            if self._status(job) is None:
                m.gone()
            return
        finally:
            self.client.publish_budget = self.client.meanwhile = None
        spec = self.client.store.spec(job) if self._status(job) else None
        expect("accepted-gone", spec is not None, f"an accepted submit left no job {job}")
        if spec is None:
            m.gone()
            return
        made = (
            str(spec.mode),
            str(spec.priority),
            spec.chunk_size,
            spec.defaults.max_new_tokens,
            spec.system_prompt,
        )
        wanted = (asked.mode, asked.priority, asked.chunk, asked.mnt, asked.system_prompt)
        expect(
            "options",
            made == wanted,
            f"submit accepted for {job} but the job is {made}, not what was asked {wanted}",
        )
        status = self._status(job)
        expect(
            "accepted-submitting", status != JobStatus.SUBMITTING, f"a finished submit left {job} submitting"
        )
        if new_incarnation or m.partial or m.asked is None or self.concurrent:
            self._adopt(job, incarnation, asked, partial=False)
            m.complete = not (self.concurrent and status is not None and status.final)
        elif m.final is not None:
            expect(
                "final-sticky",
                status == m.final,
                f"resubmitting final job {job} moved it from {m.final} to {status}",
            )

    def _after_concurrent(self, job: str, incarnation: int, asked: Submitted) -> None:
        """A submit refused because of what happened meanwhile: the job is what Redis says."""
        status = self._status(job)
        if status is None:
            self.model[job].gone()
            return
        self._adopt(job, incarnation, asked, partial=status == JobStatus.SUBMITTING)
        self.model[job].complete = False

    def _adopt(self, job: str, incarnation: int, asked: Submitted, *, partial: bool) -> None:
        m = self.model[job]
        m.incarnation, m.present, m.partial, m.asked = incarnation, True, partial, asked
        m.complete = not partial
        if not partial:
            m.final = None

    # --- the end of a job, and housekeeping --------------------------------------------------------

    @rule(job=st.sampled_from(JOBS))
    def cancel(self, job: str) -> None:
        self._refresh(job)
        try:
            self.client.job(job).cancel()
        except JobNotFound:
            expect("cancel-gone", self._status(job) is None, "cancel-gone")
            return
        status = self._status(job)
        if self.model[job].final is not None:
            expect(
                "final-sticky", status == self.model[job].final, f"cancel moved final job {job} to {status}"
            )

    @rule(job=st.sampled_from(JOBS), all_errors=st.booleans())
    def retry(self, job: str, all_errors: bool) -> None:
        self._refresh(job)
        before = self._status(job)
        try:
            self.client.job(job).retry(all_errors=all_errors)
        except JobNotFound:
            return
        except GenqError as exc:  # refused, with the reason
            expect("refused-changed", self._status(job) == before, f"a refused retry changed {job}: {exc}")
            return
        after = self._status(job)
        if before in (JobStatus.CANCELLED, JobStatus.EXPIRED):
            expect("retry-reopen", after == before, f"retry reopened {before} job {job} ({after})")
        m = self.model[job]
        if after is not None and not after.final:
            m.final = None

    @rule(job=st.sampled_from(JOBS))
    def delete(self, job: str) -> None:
        self.client.delete(job)
        self.model[job].gone()
        self._gone(job, "delete")

    @rule(job=st.sampled_from(JOBS), opts=opts_strategy())
    def reuse(self, job: str, opts: dict[str, Any]) -> None:
        """`genq delete X`, then X submitted again at once (a reused id: another incarnation,
        asking for another request).  A worker that ran X before must not answer with X's old
        spec."""
        self.delete(job)
        self.submit(job, "new", opts, None)

    @rule()
    def prune(self) -> None:
        pruned = {state.spec.job_id for state in self.client.prune(0.0)}
        for job in pruned:
            self.model[job].gone()
            self._gone(job, "prune")

    @rule(job=st.sampled_from(JOBS), ahead=st.sampled_from([10.0, 1e7]))
    def expire(self, job: str, ahead: float) -> None:
        """The controllable clock moves ``ahead`` seconds; the job's deadline is checked."""
        self.clock = max(self.clock, ahead)
        if self._status(job) is None:
            return
        # what Job.status does when the deadline has passed (with the clock's time)
        if self.client.store.expire_if_due(job, now=time.time() + self.clock):
            self.client.withdraw(job)

    @rule(job=st.sampled_from(JOBS))
    def lapse(self, job: str) -> None:
        """Redis' TTLs run out: every key of the job with a TTL goes (the submit lock too)."""
        doomed = [k for k in all_job_keys(job) if self.r.pttl(k) > 0]
        if doomed:
            self.r.delete(*doomed)
        if self._status(job) is None:
            self.model[job].gone()
            self._gone(job, "TTL lapse")

    @rule(job=st.sampled_from(JOBS))
    def look(self, job: str) -> None:
        """`genq status JOB`: a producer reads the job (which settles or expires it when due)."""
        with contextlib.suppress(JobNotFound):
            self.client.job(job).status()

    # --- workers -----------------------------------------------------------------------------------

    @rule(mode=st.sampled_from(["fp32", "nf4"]), die_after=st.none() | st.integers(0, 3))
    def deliver(self, mode: str, die_after: int | None) -> None:
        """The worker of ``mode`` takes the next message of its queues (high first, its mode before
        ``any``) and runs it; with ``die_after`` it is killed after that many results."""
        worker = self.workers[Mode(mode)]
        msg = None
        for queue in worker.runtime.queues:
            msg = self.channel.basic_get(queue, no_ack=False)
            if msg is not None:
                break
        if msg is None:
            return
        ref = msg.decode()[0][0]
        tid = str(msg.headers["id"])
        self.orphans.discard(tid)
        if die_after is None:
            self._run(worker, ref, msg)
            return
        store = worker.runtime._store
        assert store is not None
        dying = DyingStore(store)
        worker.runtime._store = dying  # type: ignore[assignment]
        worker.engine.process, worker.engine.die_after = dying, die_after
        try:
            self._run(worker, ref, msg)
        except Died:
            self.orphans.add(tid)
            store.r.connection_pool.disconnect()
            fresh = self._worker(Mode(mode), worker.restarts + 1)  # a fresh process
            fresh.engine.flaky = worker.engine.flaky
            self.workers[Mode(mode)] = fresh
            return
        finally:
            worker.engine.process, worker.engine.die_after = None, None
            worker.runtime._store = store

    @rule(rounds=st.integers(1, 12))
    def work(self, rounds: int) -> None:
        """Both workers take turns at the queues for a while."""
        for _ in range(rounds):
            self.deliver("fp32", None)
            self.deliver("nf4", None)

    def _run(self, worker: Worker, ref: dict[str, Any], msg: Any) -> None:
        """What the Celery task does with a delivery: run the chunk, dispatch, acknowledge (a
        Reject hands the message back)."""
        from celery.exceptions import Reject

        try:
            worker_task._run_chunk(worker.runtime, ChunkRef.model_validate(ref))
        except Reject:
            msg.reject(requeue=True)
            return
        except Died:
            raise
        except Exception as exc:  # Celery logs a task failure (a traceback) and acknowledges
            msg.ack()
            expect("delivery", False, f"a delivery of {ref['job_id']}:{ref['chunk_id']} failed: {exc!r}")
            return
        worker_task._dispatch(worker.runtime)
        msg.ack()

    @rule()
    def sweep(self) -> None:
        """kombu's sweep: unacknowledged messages past the visibility timeout go back to their
        queue (only a killed worker's are unacknowledged between steps)."""
        self.channel.qos.restore_visible(start=0, num=1000, interval=1)

    @rule(mode=st.sampled_from(["fp32", "nf4"]))
    def heartbeat(self, mode: str) -> None:
        self.workers[Mode(mode)].runtime.beat()

    @rule(first=st.integers(0, len(QUEUES) - 1))
    def lose(self, first: int) -> None:
        """kombu's delivery window: a worker takes a message off a queue (``BRPOP``) and stops, or
        Redis does, before it records the message unacknowledged.  The message is nowhere."""
        for queue in QUEUES[first:] + QUEUES[:first]:
            raw = self.r.rpop(queue)
            if raw is None:
                continue
            msg = _decode(json.loads(raw), queue)
            self.orphans.discard(msg.task_id)
            if self.r.hget(job_key(msg.job_id), "inc") == msg.inc:
                self.model[msg.job_id].lost |= set(msg.indices)
            return

    @rule()
    def recover(self) -> None:
        """The fleet's look for lost messages (:mod:`worker.queue.recovery`), twice, as when a
        job stayed quiet for ``GENQ_RECOVERY_SECONDS``: it publishes pending items no message
        covers, and only those."""
        snap = snapshot(self.r)
        store = self.workers[Mode.FP32].runtime.store
        recovery.recover_lost(store, quiet_for=0.0)  # the first look notes what it saw
        for done in recovery.recover_lost(store, quiet_for=0.0):
            job = done.job_id
            inc = snap.jobs[job].get("inc", "")
            waiting = {i for x in snap.messages if x.job_id == job and x.inc == inc for i in x.indices}
            again = sorted(
                {i for idx in done.chunks.values() for i in idx}
                & (waiting | set(map(int, snap.results[job])))
            )
            expect(
                "recover-precise",
                not again,
                f"{job}: items {again} published again had a message or a result",
            )
        after = snapshot(self.r)
        for job in JOBS:
            raw = after.jobs[job]
            quiet = raw.get("status") in (JobStatus.QUEUED, JobStatus.IN_PROGRESS) and not after.running[job]
            if quiet and not any(x.where == f"backlog:{job}" for x in after.messages):
                self.model[job].lost = set()  # looked at: nothing may stall now

    @rule(on=st.booleans())
    def flaky(self, on: bool) -> None:
        for worker in self.workers.values():
            worker.engine.flaky = on

    # --- reading Redis -------------------------------------------------------------------------------

    def _status(self, job: str) -> JobStatus | None:
        raw = self.r.hget(job_key(job), "status")
        return JobStatus(raw) if raw else None

    def _refresh(self, job: str, raw: str | None = "?") -> None:
        """What the model learns from Redis between steps: a job that lapsed is gone, a final
        status reached is kept."""
        m = self.model[job]
        status = self._status(job) if raw == "?" else (JobStatus(raw) if raw else None)
        if status is None:
            m.gone()
            return
        if status.final:
            m.final = status
        if m.partial and status != JobStatus.SUBMITTING:
            m.partial = False

    def _gone(self, job: str, how: str) -> None:
        left = [k for k in self.r.scan_iter(f"{job_key(job)}*")]
        expect("gone", not left, f"after {how} of {job}, keys remain: {left}")

    # --- invariants --------------------------------------------------------------------------------------

    checked = 0
    """Invariant checks made in this process (one before the first step, one after each)."""

    @invariant()
    def check(self) -> None:
        LifecycleMachine.checked += 1
        snap = snapshot(self.r)
        ids = [m.task_id for m in snap.messages]
        twice = {t for t in ids if ids.count(t) > 1}
        expect("message-twice", not twice, f"a message in two places at once: {sorted(twice)}")
        for job in JOBS:
            self._refresh(job, snap.jobs[job].get("status"))
            self._check_job(job, snap)

    def _check_job(self, job: str, snap: Snapshot) -> None:
        m = self.model[job]
        raw, ttls = snap.jobs[job], snap.ttls[job]
        if not raw:
            expect("gone", not ttls, f"job {job} has no hash but keys remain: {sorted(ttls)}")
            return
        expect("gone", m.present, f"job {job} exists in Redis but the model has it gone")
        status = JobStatus(raw["status"])
        spec = JobSpec.model_validate_json(raw["spec"])
        # messages of an older incarnation of this id are dropped by whoever takes them
        messages = [x for x in snap.messages if x.job_id == job and x.inc == spec.incarnation]
        total = int(raw["total"])
        counts = {k: int(raw.get(k, 0)) for k in ("succeeded", "errored", "cancelled", "expired")}
        expect("counts", all(v >= 0 for v in counts.values()), f"{job}: a negative count {counts}")
        finished = sum(counts.values())
        expect("counts", finished <= total, f"{job}: counts {counts} add up to more than total {total}")
        pending = total - finished
        rows = len(snap.results[job])
        expect(
            "counts",
            rows == counts["succeeded"] + counts["errored"],
            (f"{job}: {rows} results stored for succeeded+errored {counts}"),
        )
        # a final job stays final
        if m.final is not None:
            expect(
                "final-sticky",
                status == m.final or (m.final == JobStatus.COMPLETED and not status.final),
                (f"{job} was {m.final} and is now {status}"),
            )
        # every key of a partial or final job expires
        if status == JobStatus.SUBMITTING or status.final:
            no_ttl = sorted(k for k, ttl in ttls.items() if ttl < 0)
            expect("ttl", not no_ttl, f"{job} is {status} but these keys never expire: {no_ttl}")
        queue = queue_name(spec.profile, spec.mode, spec.priority)
        # a ring entry of an older incarnation is dropped by the dispatch that meets it
        this = (job, spec.incarnation)
        live = [x for x in messages if x.task_id not in self.orphans]
        # a pinned job's messages wait on its mode's queue; an any job's on a queue of its level
        runs_on = set(job_queues(spec)) if spec.mode == QueueMode.ANY else {queue}
        astray = [(x.task_id, x.where) for x in messages if x.where in QUEUES and x.where not in runs_on]
        expect("wrong-queue", not astray, f"{job} ({queue}) has messages on other queues: {astray}")
        if status.final:
            expect(
                "final-pending",
                pending == 0,
                f"{job} is {status} with {pending} pending of {total} ({counts})",
            )
            expect(
                "final-messages",
                not live,
                f"{job} is {status} but has messages: {[(x.task_id, x.where) for x in live]}",
            )
            held = [q for q, entries in snap.rings.items() if this in entries]
            expect("final-ring", not held, f"{job} is {status} but is in the ring of {held}")
        else:
            elsewhere = [q for q, entries in snap.rings.items() if this in entries and q != queue]
            expect("other-ring", not elsewhere, f"{job} ({queue}) is in the ring of {elsewhere}")
        self._check_results(job, m, total, snap.results[job])
        if status in (JobStatus.QUEUED, JobStatus.IN_PROGRESS) and pending:
            in_ring = any(this in entries for entries in snap.rings.values())
            self._check_runnable(job, total, set(map(int, snap.results[job])), messages, in_ring)
        if status == JobStatus.CANCELLING:
            expect("cancelling", snap.running[job], f"{job} stays cancelling with nothing running")

    def _check_results(self, job: str, m: ModelJob, total: int, results: dict[str, str]) -> None:
        asked = m.asked
        if asked is None or (m.partial and total == 0):
            return
        want = len(asked.records)
        fits = total == want if m.complete else total <= want
        expect("results", fits, f"{job}: total {total}, asked {want} (its submit finished: {m.complete})")
        for key, raw in results.items():
            index = int(key)
            expect("results", 0 <= index < len(asked.records), f"{job}: a result for item {index} of {total}")
            record = asked.records[index]
            result = ItemResult.model_validate_json(raw)
            expect(
                "results",
                result.id == record["id"],
                f"{job}: item {index} is {record['id']}, answered {result.id}",
            )
            kind = result.error.type if result.error is not None else None
            if "prompt" not in record:
                expect(
                    "results",
                    kind == ErrorCode.INVALID_INPUT,
                    f"{job} item {index}: invalid, answered {kind}",
                )
                continue
            if result.status == ItemStatus.ERROR:
                lost = (ErrorCode.GENERATION_ERROR, ErrorCode.WORKER_LOST)
                expect("results", kind in lost, f"{job} item {index}: errored with {kind}")
                continue
            want = answer_text(record["prompt"], asked.mnt, asked.system_prompt)
            expect(
                "results",
                result.text == want,
                (
                    f"{job} item {index} answers another request (max_new_tokens "
                    f"{result.usage.completion_tokens}, asked {asked.mnt})"
                ),
            )

    def _check_runnable(
        self, job: str, total: int, done: set[int], messages: list[Message], in_ring: bool
    ) -> None:
        """No stall: each pending item is in a chunk some message can still deliver (a backlog's
        only while the job is in a ring: the dispatcher serves rings)."""
        covered: set[int] = set()
        for msg in messages:
            if msg.where.startswith("backlog:") and not in_ring:
                continue
            covered |= set(msg.indices)
        stuck = sorted(set(range(total)) - done - covered - self.model[job].lost)
        expect("stall", not stuck, f"{job} stalls: items {stuck} pending and no message can run them")


def machine_settings() -> settings:
    if STEPS:
        count = 50
        return settings(
            max_examples=max(1, STEPS // count),
            stateful_step_count=count,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
    return settings(
        max_examples=CI_EXAMPLES,
        stateful_step_count=CI_STEP_COUNT,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    server = RedisServer(tmp_path_factory.mktemp("mbt-redis"), appendonly=False)
    server.start()
    WORLD.url = server.url
    try:
        yield WORLD
    finally:
        server.stop()


@pytest.fixture
def small_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inputs are stored (in blocks of two), and chunks claimed, two at a time, so that a submit
    of a few items is interrupted between pages as a big one would be."""
    monkeypatch.setattr(producer.submit, "PAGE", 2)
    monkeypatch.setattr(input_blocks, "BLOCK", 2)


def test_lifecycle_model(world: World, small_pages: None) -> None:
    before = LifecycleMachine.checked
    run_state_machine_as_test(LifecycleMachine, settings=machine_settings())
    print(f"lifecycle model: {LifecycleMachine.checked - before} steps checked")


# --- what the walk found, replayed ------------------------------------------------------------------


def _replay(steps: Sequence[tuple[str, dict[str, Any]]]) -> None:
    state = LifecycleMachine()
    try:
        state.check()
        for name, kwargs in steps:
            getattr(state, name)(**kwargs)
            state.check()
    finally:
        state.teardown()


def _opts(**kw: Any) -> dict[str, Any]:
    base = {
        "n": 3,
        "chunk": 1,
        "mode": "any",
        "priority": "high",
        "mnt": 2,
        "expires": None,
        "invalid": None,
        "flaky": None,
        "skip_invalid": False,
        "system": False,
    }
    return {**base, **kw}


REGRESSIONS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    # a cancelled job kept its messages on the broker queue and its place in the ring
    "cancel_leaves_messages_and_ring": [
        ("submit", {"job": "a", "variant": "new", "opts": _opts(), "interrupt": None}),
        ("cancel", {"job": "a"}),
    ],
    # a finished job resubmitted with another priority was "resumed", keeping the old priority
    "resubmit_with_another_priority": [
        ("submit", {"job": "a", "variant": "new", "opts": _opts(n=1), "interrupt": None}),
        ("submit", {"job": "a", "variant": "priority", "opts": _opts(priority="low"), "interrupt": None}),
    ],
    # a long-lived worker answered a job id submitted again with the spec of the deleted one
    "reused_id_answered_with_the_old_spec": [
        (
            "submit",
            {"job": "a", "variant": "new", "opts": _opts(n=2, chunk=2, mode="fp32"), "interrupt": None},
        ),
        ("deliver", {"mode": "fp32", "die_after": None}),
        ("delete", {"job": "a"}),
        (
            "submit",
            {
                "job": "a",
                "variant": "new",
                "opts": _opts(n=2, chunk=2, mnt=5, mode="fp32"),
                "interrupt": None,
            },
        ),
        ("deliver", {"mode": "fp32", "die_after": None}),
    ],
    # retry reopened an expired job
    "retry_reopens_an_expired_job": [
        (
            "submit",
            {"job": "a", "variant": "new", "opts": _opts(n=2, flaky=0, expires=1e6), "interrupt": None},
        ),
        ("deliver", {"mode": "fp32", "die_after": None}),
        ("expire", {"job": "a", "ahead": 1e7}),
        ("retry", {"job": "a", "all_errors": False}),
    ],
    # a cancel while the submit stores inputs: the submit went on and left a job final with items
    # pending, or one nothing would ever run
    "cancel_during_the_submit": [
        ("submit", {"job": "a", "variant": "new", "opts": _opts(n=4), "interrupt": ("input", 2, "cancel")}),
        ("work", {"rounds": 4}),
    ],
    # a delete while the submit stores inputs
    "delete_during_the_submit": [
        ("submit", {"job": "a", "variant": "new", "opts": _opts(n=4), "interrupt": ("input", 2, "delete")}),
        ("work", {"rounds": 4}),
    ],
    # found by the 100,000-step walk: an invalid first line with a stray "params" field made the
    # whole file an Anthropic one, so every valid line after it was refused as a mix of formats
    "invalid_first_line_decided_the_dialect": [
        (
            "submit",
            {
                "job": "a",
                "variant": "new",
                "opts": _opts(n=2, invalid=0, skip_invalid=True),
                "interrupt": None,
            },
        ),
    ],
    # found by the 100,000-step walk (here without the steps before the id was reused): a job
    # completed by a chunk whose item a retry round had reopened kept that round's message on a
    # mode's queue (a worker would take it only to drop it)
    "completed_job_keeps_a_retry_rounds_message": [
        (
            "submit",
            {
                "job": "a",
                "variant": "new",
                "opts": _opts(n=4, chunk=3, invalid=0, skip_invalid=True),
                "interrupt": ("input", 5, "stop"),
            },
        ),
        ("retry", {"job": "a", "all_errors": True}),
        ("work", {"rounds": 1}),
    ],
    # a partial job's keys lapsed while its backlog waited in the fp32 ring; its id submitted
    # again pinned to nf4 was in both rings, and an fp32 worker's dispatch put its chunks on the
    # fp32 queue
    "lapsed_job_left_in_the_old_modes_ring": [
        (
            "submit",
            {
                "job": "a",
                "variant": "new",
                "opts": _opts(n=5, mode="fp32"),
                "interrupt": ("publish", 4, "stop"),
            },
        ),
        ("lapse", {"job": "a"}),
        ("submit", {"job": "a", "variant": "new", "opts": _opts(n=3, mode="nf4"), "interrupt": None}),
        ("deliver", {"mode": "fp32", "die_after": None}),
    ],
    # the partial job's keys lapse while its submit stores inputs
    "lapse_during_the_submit": [
        ("submit", {"job": "a", "variant": "new", "opts": _opts(n=4), "interrupt": ("input", 2, "lapse")}),
        ("work", {"rounds": 4}),
    ],
}


@pytest.mark.parametrize("name", sorted(REGRESSIONS))
def test_what_the_walk_found(world: World, small_pages: None, name: str) -> None:
    _replay(REGRESSIONS[name])


def test_delete_during_the_publish_is_refused_in_one_line(world: World, small_pages: None) -> None:
    """A delete while the submit publishes its chunks: the submit must end with the state table's
    refusal (a GenqError naming why), not redis' ResponseError and a traceback."""
    _replay(
        [("submit", {"job": "c", "variant": "new", "opts": _opts(), "interrupt": ("publish", 0, "delete")})]
    )


def test_two_retries_within_a_second_leave_nothing_pending_unrun(world: World, small_pages: None) -> None:
    """The second retry forgets the errors again; its round's chunk id must not be the first
    round's (once ``r<seconds>-000000``: the chunk was not new, nothing was published, and the job
    stalled)."""
    retry = ("retry", {"job": "a", "all_errors": False})
    work = ("work", {"rounds": 1})
    submit = ("submit", {"job": "a", "variant": "new", "opts": _opts(n=1, flaky=0), "interrupt": None})
    _replay([submit, work, retry, work, retry])
