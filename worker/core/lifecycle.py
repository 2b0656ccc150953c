"""A job's life, written once: its states × every event that changes a job → the next state, or a
refusal with its reason (no Redis, no Celery).

The store's Lua scripts do not hold their own idea of what is allowed: each guarded step receives
:func:`allowed` for its event and checks the job's status (and its incarnation) in the same
atomic script that applies the change; a refusal comes back as the job's status and is turned
into :func:`refusal`, the one line of this table.  docs/OPERATIONS.md shows this table
(:func:`markdown`, checked by tests/test_state_table.py).

A job id deleted (or expired) and submitted again is a new *incarnation*: a token stored with the
job and carried by its spec and by every chunk message, so that nothing of the old one (messages,
claims, cached specs, results) can act on or be counted for the new one.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from worker.core.errors import JobNotFound, JobRefused
from worker.core.states import JobStatus

ABSENT = "absent"
"""No job of this id (never submitted, deleted, its keys expired), or, for a message or a cached
spec, another incarnation of it: for them the job they belong to is gone."""

STATES: tuple[str, ...] = (ABSENT, *(str(s) for s in JobStatus))


class Event(StrEnum):
    """Everything that changes a job (or tries to)."""

    SUBMIT_BEGIN = "submit begins"
    WRITE_PAGE = "submit writes a page"
    PUBLISH = "publish chunks"
    SUBMIT_FINISH = "submit finishes"
    RESUME = "resume"
    RESUME_OTHER = "resume, other options"
    DELIVER = "chunk delivered"
    RECORD = "item recorded"
    CHUNK_DONE = "chunk done"
    CANCEL = "cancel"
    EXPIRE = "expire"
    RETRY = "retry"
    DELETE = "delete"
    PRUNE = "prune"
    TTL_LAPSE = "TTL lapse"
    WORKER_DEATH = "worker death"
    LEASE_RENEWED = "lease renewed"
    LEASE_LAPSES = "lease lapses"
    BACKUP = "backup taken"
    TIME_BOX = "time box ends"
    WASTE = "waste counted"
    DRAIN = "results drained"
    FOLLOW_LEASE = "follower lease"
    RECOVER = "lost message recovered"


@dataclass(frozen=True)
class Move:
    """The event applies: the job goes to one of ``to`` (the first is the usual one)."""

    to: tuple[str, ...]
    note: str = ""


@dataclass(frozen=True)
class Refuse:
    """The event does not apply: nothing changes, and the caller hears ``reason`` (``{job}`` is
    the job id)."""

    reason: str


Entry = Move | Refuse

S, Q, P, CG = JobStatus.SUBMITTING, JobStatus.QUEUED, JobStatus.IN_PROGRESS, JobStatus.CANCELLING
C, X, E = JobStatus.COMPLETED, JobStatus.CANCELLED, JobStatus.EXPIRED
FINAL = (str(C), str(X), str(E))
LIVE = (str(S), str(Q), str(P))

_GONE = "no job {job} (deleted, or expired: its keys lapsed)"
_ENDING = (str(CG), str(X), str(C))
"""Cancel: ``cancelling``, and at once ``cancelled`` (``completed`` when nothing was left) when no
chunk runs."""
_EXPIRING = (str(CG), str(E), str(C))
_DROPPED = "the backlog and queued messages are dropped; settles at once when no chunk runs"
_NEW = "submit it as a new job (--new, or another --job-id), or `genq delete {job}` first"


def _same(state: str, note: str = "") -> Move:
    return Move((state,), note)


def _row(state: str, **cells: Entry) -> dict[Event, Entry]:
    return {Event[name.upper()]: entry for name, entry in cells.items()}


def _final_row(state: str) -> dict[Event, Entry]:
    """Completed, cancelled and expired share most of their row."""
    ended = state != C
    was = "expired" if state == E else "was cancelled"
    retry: Entry = (
        Refuse(f"job {{job}} {was}: its items are not errors and never run again; {_NEW}")
        if ended
        else Move((str(P), str(C)), "errored items whose error may pass run again; first finish time kept")
    )
    return _row(
        state,
        submit_begin=_same(state, "the submit resumes it (see resume)"),
        write_page=(
            Refuse(f"job {{job}} {was} during its submit: nothing more of it is stored")
            if ended
            else Refuse("job {job} is already submitted")
        ),
        publish=Refuse(f"job {{job}} is {state}: nothing is published"),
        submit_finish=(
            Refuse(f"job {{job}} {was} during its submit")
            if ended
            else _same(state, "a second submit of a finished job: nothing changes")
        ),
        resume=_same(state, "nothing is published; the report gives the counts"),
        deliver=Refuse(f"job {{job}} is {state}: the chunk is dropped without generating"),
        record=(
            Refuse(f"job {{job}} {was}: its counts never move again")
            if ended
            else _same(state, "a duplicate: first write wins, nothing is counted")
        ),
        chunk_done=_same(state),
        cancel=_same(state, "already ended: nothing to cancel"),
        expire=_same(state, "already ended"),
        retry=retry,
        delete=Move((ABSENT,), "every key and waiting message removed"),
        prune=Move((ABSENT,), "when it ended before --older-than"),
        ttl_lapse=Move((ABSENT,), "GENQ_RESULT_TTL after its end"),
        worker_death=_same(state),
    )


_OTHER = Refuse("job {job} was submitted with {option}: resubmit with the same to resume it, or " + _NEW)
"""Resubmitting with another chunk size, mode, priority, --skip-invalid, profile, parameters or
system prompt (``{option}`` names the first that differs, as it was first given)."""

TABLE: dict[str, dict[Event, Entry]] = {
    ABSENT: _row(
        ABSENT,
        submit_begin=Move((str(S),), "a new incarnation; keys an old one left behind are removed first"),
        write_page=Refuse("job {job} was deleted, or its partial submit expired, during its submit"),
        publish=Refuse(_GONE),
        submit_finish=Refuse("job {job} was deleted, or its partial submit expired, during its submit"),
        resume=Move((str(S),), "as a new submit"),
        resume_other=Move((str(S),), "as a new submit"),
        deliver=Refuse(f"{_GONE}: a message of it (or of an older incarnation) is dropped"),
        record=Refuse(f"{_GONE}: results of it (or of an older incarnation) are dropped"),
        chunk_done=_same(ABSENT),
        cancel=Refuse(_GONE),
        expire=_same(ABSENT),
        retry=Refuse(_GONE),
        delete=_same(ABSENT, "nothing to delete"),
        prune=_same(ABSENT),
        ttl_lapse=_same(ABSENT),
        worker_death=_same(ABSENT),
    ),
    str(S): _row(
        S,
        submit_begin=_same(S, "the submit resumes it (see resume)"),
        write_page=_same(S, "inputs stored; every key's TTL (GENQ_SUBMIT_TTL) starts again"),
        publish=_same(S, "chunks claimed (a bit each) and put in the job's backlog"),
        submit_finish=Move(
            (str(Q), str(P), str(C)),
            "in_progress once a chunk started, completed when nothing is left; TTL lifted",
        ),
        resume=_same(
            S,
            "inputs checked against the stored ones; chunks with a pending item and no live message "
            "published; the first submit's --expires-in stands",
        ),
        deliver=_same(S, "the chunk runs (may start before the submit ends); past its deadline: expire"),
        record=_same(S, "counted; the job finishes only when its submit does"),
        chunk_done=_same(S),
        cancel=Move(
            _ENDING, "items not yet stored are not part of the job; the submit is refused at its next step"
        ),
        expire=Move(_EXPIRING, "as cancel, once --expires-in has passed"),
        retry=Refuse("job {job} is still being submitted: finish it first (run the same submit again)"),
        delete=Move((ABSENT,), "the submit is refused at its next step and leaves nothing behind"),
        prune=Move((ABSENT,), "a partial job nobody submits, last touched before --older-than"),
        ttl_lapse=Move((ABSENT,), "GENQ_SUBMIT_TTL after its last page; the submit is refused next"),
        worker_death=_same(S),
    ),
    str(Q): _row(
        Q,
        submit_begin=_same(Q, "the submit resumes it (see resume)"),
        write_page=Refuse("job {job} is already submitted"),
        publish=_same(Q),
        submit_finish=_same(Q, "a second submit: nothing changes"),
        resume=_same(Q, "chunks whose message was lost (and have a pending item) are published again"),
        deliver=Move((str(P),), "the attempt is counted; past its deadline: expire"),
        record=Move((str(P), str(C))),
        chunk_done=_same(Q),
        cancel=Move(_ENDING, _DROPPED),
        expire=Move(_EXPIRING, "as cancel, once --expires-in has passed"),
        retry=_same(Q, "nothing has errored yet"),
        delete=Move((ABSENT,), "every key and waiting message removed"),
        prune=Refuse("job {job} is queued: prune leaves it alone"),
        ttl_lapse=Refuse("job {job} has no TTL while it is live"),
        worker_death=_same(Q),
    ),
    str(P): _row(
        P,
        submit_begin=_same(P, "the submit resumes it (see resume)"),
        write_page=Refuse("job {job} is already submitted"),
        publish=_same(P, "retry rounds and split chunks"),
        submit_finish=_same(P, "a second submit: nothing changes"),
        resume=_same(P, "chunks whose message was lost (and have a pending item) are published again"),
        deliver=_same(P, "past the cap the chunk is split; past its deadline: expire"),
        record=Move((str(P), str(C)), "completed with the last item"),
        chunk_done=_same(P),
        cancel=Move(_ENDING, _DROPPED),
        expire=Move(_EXPIRING, "as cancel, once --expires-in has passed"),
        retry=Move((str(P), str(C)), "errored items whose error may pass are run again"),
        delete=Move((ABSENT,), "a chunk in flight finds the job gone and drops it (no task failure)"),
        prune=Refuse("job {job} is in progress: prune leaves it alone"),
        ttl_lapse=Refuse("job {job} has no TTL while it is live"),
        worker_death=_same(P, "the message is redelivered; finished items are kept"),
    ),
    str(CG): _row(
        CG,
        submit_begin=_same(CG, "the submit resumes it (see resume)"),
        write_page=Refuse("job {job} was cancelled during its submit: nothing more of it is stored"),
        publish=Refuse("job {job} is being cancelled: nothing is published"),
        submit_finish=Refuse("job {job} was cancelled during its submit"),
        resume=_same(CG, "nothing is published"),
        deliver=Refuse("job {job} is being cancelled: the chunk is dropped without generating"),
        record=Move((str(CG), str(C)), "a micro-batch in flight finishes and is counted"),
        chunk_done=Move(
            (str(X), str(E), str(C)),
            "the last live chunk settles it: items without a result are counted cancelled (expired); "
            "completed when none is left",
        ),
        cancel=_same(CG),
        expire=_same(CG),
        retry=Refuse(f"job {{job}} is being cancelled: nothing is retried; {_NEW}"),
        delete=Move((ABSENT,), "every key and waiting message removed"),
        prune=Refuse("job {job} is being cancelled: prune leaves it alone"),
        ttl_lapse=Refuse("job {job} settles before any TTL"),
        worker_death=_same(CG, "settles once the dead worker's chunk's lease lapsed (GENQ_LEASE_SECONDS)"),
    ),
    str(C): _final_row(C),
    str(X): _final_row(X),
    str(E): _final_row(E),
}


def _fleet_row(state: str) -> dict[Event, Entry]:
    """A running chunk's lease, its backup and time box, wasted work, and a follower's drain.
    None of them moves the job.  Backup and time box record a chunk (``chunks.lua``, guarded
    like *publish chunks*); drain is guarded (a collector of another incarnation drains nothing
    of this one).  Lease renewal, the lease sweep and the follower lease touch no field of the
    job and recreate no key of a job that is gone: they need no guard (their next guarded step
    is checked)."""
    live, gone = state in LIVE, state == ABSENT
    ending = "being cancelled" if state == CG else state
    renew = "kombu's delivery time and this worker's `running` entry move to now (the entry only "
    renew += "while it is this worker's: a chunk of a gone job recreates no key); no guard needed"
    lapse = "the message goes back to its queue (kombu's restore, in a transaction a renewal wins); "
    lapse += "no guard needed: its next delivery is checked as *chunk delivered*"
    if state == CG:
        lapse = "as in a live job; the redelivered chunk is dropped, and the job settles once the "
        lapse += "chunk's `running` entry is older than GENQ_LEASE_SECONDS"
    return _row(
        state,
        lease_renewed=_same(state, renew),
        lease_lapses=_same(state, lapse),
        backup=(
            _same(
                state,
                "a backup chunk `<cid>.b` of the unfinished items (at most one per chunk); "
                "both run, first write wins",
            )
            if live
            else Refuse(
                f"{_GONE}: no backup is taken" if gone else f"job {{job}} is {ending}: no backup is taken"
            )
        ),
        time_box=(
            _same(state, "what is left is recorded as `<cid>.r` and published; this delivery ends")
            if live
            else Refuse(
                f"{_GONE}: the chunk is dropped"
                if gone
                else f"job {{job}} is {ending}: what is left is not handed on"
            )
        ),
        waste=_same(
            state,
            "nothing counted: the job's hash is never recreated; guarded by the incarnation"
            if gone
            else "tokens generated and not kept (another write came first) counted on the job; a chunk "
            "of another incarnation counts nothing",
        ),
        drain=(
            Refuse(f"{_GONE}: nothing is drained (nor of a new incarnation of the same id)")
            if gone
            else _same(
                state,
                "each result durable in the collector's output is marked in `drained` and leaves Redis "
                "(an error moves to `drained_errors`, its input kept for retry); a result changed since "
                "it was read stays",
            )
        ),
        recover=(
            _same(
                state,
                "the job is quiet (pending items, empty backlog, nothing running, counts unmoved for "
                "GENQ_RECOVERY_SECONDS) and some pending item has no message anywhere: such items are "
                "recorded as new chunks `l<time>-<n>` and published",
            )
            if state in (str(Q), str(P))
            else Refuse(
                f"{_GONE}: nothing is published"
                if gone
                else "job {job} is being submitted: its submit publishes (run it again to resume)"
                if state == str(S)
                else f"job {{job}} is {ending}: nothing is published"
            )
        ),
        follow_lease=_same(
            state,
            "harmless, no guard: the key lapses by itself in seconds; the collector's first drain is refused"
            if gone
            else "one collector per job: a key of its own with a short TTL, not the job's state; "
            "no guard needed",
        ),
    )


for _state, _cells in TABLE.items():
    _cells.setdefault(Event.RESUME_OTHER, _OTHER)
    _cells.update(_fleet_row(_state))
    # a final or live job refuses a resume with other options the same way
del _state, _cells
TABLE = {state: {event: TABLE[state][event] for event in Event} for state in STATES}


def entry(state: str, event: Event) -> Entry:
    return TABLE[state][event]


def allowed(event: Event) -> tuple[str, ...]:
    """The statuses from which ``event`` applies (what the store's Lua guard is given)."""
    return tuple(s for s in STATES if s != ABSENT and isinstance(TABLE[s][event], Move))


def allowed_arg(event: Event) -> str:
    """:func:`allowed`, space-separated: one ARGV of a guarded Lua script."""
    return " ".join(allowed(event))


def refusal(event: Event, state: str | None, job_id: str, **fill: str) -> JobRefused | JobNotFound:
    """The error for ``event`` refused from ``state`` (None: the job is absent)."""
    state = state or ABSENT
    found = TABLE[state][event]
    reason = found.reason if isinstance(found, Refuse) else f"job {{job}} is {state}: {event} does not apply"
    message = reason.format(job=job_id, **{"option": "other options", **fill})
    if state == ABSENT:
        return JobNotFound(message)
    return JobRefused(message, state=state, event=str(event))


def markdown() -> str:
    """The table as docs/OPERATIONS.md shows it: one row per event, one column per state."""

    def cell(e: Entry) -> str:
        if isinstance(e, Refuse):
            return "refused"
        return " / ".join(f"**{t}**" if t != ABSENT else "gone" for t in e.to)

    head = "| event | " + " | ".join(STATES) + " |"
    rule = "|---" * (len(STATES) + 1) + "|"
    rows = [f"| {ev} | " + " | ".join(cell(TABLE[s][ev]) for s in STATES) + " |" for ev in Event]
    notes = []
    for ev in Event:
        said: dict[str, list[str]] = {}
        for s in STATES:
            e = TABLE[s][ev]
            text = e.reason.format(job="X", option="OPT") if isinstance(e, Refuse) else e.note
            if text:
                said.setdefault(text, []).append(f"`{s}`")
        for text, states in said.items():
            notes.append(f"- *{ev}* from {', '.join(states)}: {text}")
    return "\n".join([head, rule, *rows, "", *notes]) + "\n"
