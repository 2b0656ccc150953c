"""Every Redis key genq uses, in one place.

All keys live under ``genq:``.  A job's keys:

=============================  ============================================================
``job:<id>``                   hash: ``spec`` (JSON), ``status``, ``inc`` (the incarnation),
                               counters, token totals, times, ``expires_at`` (the deadline),
                               ``ending`` (why a ``cancelling`` job ends), submit progress,
                               ``route`` (JSON: the broker queues and rings its messages may
                               wait in, taken out of in the step that ends or completes it)
``job:<id>:inputs``            hash: ``b<n>`` → block *n* of the inputs: the Item JSON of 50
                               consecutive items, zlib-compressed (stored once, at submit;
                               :mod:`worker.store.blocks`)
``job:<id>:results``           hash: item index → ItemResult JSON (first write wins)
``job:<id>:chunks``            hash: chunk id → JSON index list, for chunks that are not a plain
                               range of the input (split children, retry rounds)
``job:<id>:claims``            bitmap: bit *n* set once chunk ``c<n>`` is claimed for publishing
``job:<id>:attempts``          hash: chunk id → deliveries started
``job:<id>:running``           hash: chunk id → ``worker|since`` while a worker runs it
``job:<id>:workers``           hash: ``<worker>:items`` / ``<worker>:tokens`` per worker
``job:<id>:backlog``           list: the job's chunk messages not yet on the broker queue (kombu
                               envelopes), oldest first; :mod:`worker.store.dispatch` moves them
``job:<id>:submitter``         string, short TTL: held by the process submitting the job
``job:<id>:drained``           bitmap: bit *n* set once item *n* is durably in the output file of
                               a `genq collect --follow` (its result and input then leave Redis;
                               an error's input is kept, for `genq retry`)
``job:<id>:drained_errors``    hash: item index → ItemResult JSON of an error drained to the output
``job:<id>:kept_inputs``       hash: item index → Item JSON of such an error (its block may be
                               gone: a block leaves Redis once all of its items are drained)
``job:<id>:follower``          string, short TTL: the lease of the job's one ``--follow`` collector
``job:<id>:events``            pub/sub channel (not a key): the final status, once
=============================  ============================================================

Others: ``jobs`` (sorted set: job id by creation time, the job index), ``worker:<name>``
(heartbeat JSON with a TTL), ``workers`` (sorted set: worker name by last heartbeat) and
``throughput`` (hash: worker class → measured tokens/s, for `genq estimate`), and per broker
queue ``<queue>`` (the Celery queue name): ``ring:<queue>`` (list: the jobs with a backlog for
that queue, served round robin, each as ``<job>@<incarnation>``), ``ring:<queue>:turn``
(counter: whose turn it is between the queue's ring and its level's ``any`` ring) and
``consumers:<queue>`` (sorted set: worker name by the time its heartbeat expires; how many
workers consume the queue).

Plain chunks are ranges: chunk ``c<n>`` holds items ``n × chunk_size`` up to the next chunk, so
a million-item job stores no chunk records at all (:func:`worker.chunks.chunk_range`).
"""

from __future__ import annotations

PREFIX = "genq:"
JOBS_INDEX = f"{PREFIX}jobs"
WORKERS_INDEX = f"{PREFIX}workers"
THROUGHPUT = f"{PREFIX}throughput"
"""Hash: worker class (profile|mode|device|hardware) → the last measured tokens/s (JSON)."""

DRAIN = ("drained", "drained_errors", "kept_inputs")
"""The keys of a job followed by `genq collect --follow` (:mod:`worker.store.drain`)."""

JOB_PARTS = ("inputs", "results", "chunks", "claims", "attempts", "running", "workers", "backlog", *DRAIN)
"""The keys a job's data lives in besides its hash: they expire together with it."""

SUBMITTER = "submitter"
"""The submit lock: a key of its own lifetime (never part of :func:`job_keys`' TTL changes)."""

FOLLOWER = "follower"
"""The lease of the job's ``genq collect --follow``: a key of its own lifetime, like the submit lock."""

PAGE = 1000
"""Items read or written per Redis round trip."""


def job_key(job_id: str, part: str = "") -> str:
    return f"{PREFIX}job:{job_id}" + (f":{part}" if part else "")


def job_keys(job_id: str) -> list[str]:
    """The job's hash and the keys of its data (not its submit lock)."""
    return [job_key(job_id)] + [job_key(job_id, p) for p in JOB_PARTS]


def all_job_keys(job_id: str) -> list[str]:
    """Every key of the job, its submit lock included (what `genq delete` removes)."""
    return [*job_keys(job_id), job_key(job_id, SUBMITTER), job_key(job_id, FOLLOWER)]


def events_channel(job_id: str) -> str:
    return job_key(job_id, "events")


def worker_key(name: str) -> str:
    return f"{PREFIX}worker:{name}"


JOB_PREFIX = f"{PREFIX}job:"
"""What :func:`job_key` puts before a job id (the dispatcher's Lua builds job keys from it)."""


def backlog_key(job_id: str) -> str:
    return job_key(job_id, "backlog")


def ring_key(queue: str) -> str:
    """The jobs with chunks waiting for broker queue ``queue``, served round robin."""
    return f"{PREFIX}ring:{queue}"


def turn_key(queue: str) -> str:
    """Counter: whose turn it is when ``queue`` is topped up from its own ring and the ``any``
    queue's ring (:mod:`worker.store.dispatch`)."""
    return f"{ring_key(queue)}:turn"


def consumers_key(queue: str) -> str:
    """The live workers consuming broker queue ``queue`` (score: when their heartbeat expires)."""
    return f"{PREFIX}consumers:{queue}"
