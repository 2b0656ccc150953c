"""genq reads and writes formats its dependencies keep private; a test per dependency that fails,
naming what changed, when an upgrade moves them (pyproject.toml pins the ranges these ran on):

- kombu and Celery: genq's pipelined publisher (worker/queue/publish.py) builds task messages with
  Celery's ``as_task_v2`` and kombu's ``prepare_message``, ``_inplace_augment_message`` and
  ``_q_for_pri``; worker/store/lua/dispatch.lua moves them onto the list kombu consumes;
  worker/store/lua/rescue.lua reads a waiting message's ``headers.id`` and
  ``properties.delivery_info.routing_key``;
  worker/queue/messages.py and worker/queue/exporter.py read kombu's queues, bindings and
  ``unacked`` hash.  Checked against what ``send_task`` and a real kombu consumer write.
- peft: worker/engine/adapters.py sets LoRA layers' ``_active_adapter``.
- prometheus-client: worker/queue/metrics.py reads a metric's ``_name`` and ``_type``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.helpers import RedisServer
from worker.core.schema import ChunkRef, JobSpec
from worker.core.settings import Settings
from worker.queue import exporter, messages
from worker.queue.app import make_app
from worker.queue.publish import _message, publish_chunks
from worker.queue.routing import TASK_NAME, queue_name, task_id
from worker.store import RedisStore

JOB = "layoutjob"
QUEUE = queue_name("tiny-random", "fp32")
"""A job pinned to a mode: its messages reach its mode's queue at the publish's own dispatch (an
``any`` job's wait in its backlog until a live worker of a mode dispatches them)."""


class Broker:
    """A real Redis, genq's Celery app on it, and the job store (a job in progress, so the
    dispatcher moves its messages)."""

    def __init__(self, server: RedisServer) -> None:
        self.settings = Settings.from_env({"GENQ_BROKER_URL": server.url, "GENQ_QUEUE_DEPTH": "50"})
        self.app = make_app(self.settings)
        self.store = RedisStore(settings=self.settings)
        self.r = server.client()
        self.spec = JobSpec(job_id=JOB, profile="tiny-random", chunk_size=2, total=6, mode="fp32")
        self.r.hset(f"genq:job:{JOB}", mapping={"status": "in_progress", "spec": self.spec.model_dump_json()})

    def publish(self, n: int) -> list[ChunkRef]:
        chunks = {f"c{i:06d}": [2 * i, 2 * i + 1] for i in range(n)}
        assert publish_chunks(self.spec, chunks, self.app, store=self.store) == n
        return [ChunkRef(job_id=JOB, chunk_id=c, indices=idx) for c, idx in chunks.items()]


@pytest.fixture
def broker(redis_server: RedisServer) -> Iterator[Broker]:
    b = Broker(redis_server)
    yield b
    b.app.close()


def paths(value: Any, prefix: str = "") -> dict[str, str]:
    """Every field of a JSON document by its dotted path, with its JSON type."""
    if isinstance(value, dict) and value:
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(paths(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): type(value).__name__}


def layout_diff(ours: dict[str, Any], theirs: dict[str, Any], who: str) -> list[str]:
    """What differs between genq's envelope and ``who``'s, field by field."""
    a, b = paths(ours), paths(theirs)
    out = [f"genq writes field {p!r}, which {who} does not" for p in sorted(a.keys() - b.keys())]
    out += [f"genq lacks field {p!r}, which {who} writes" for p in sorted(b.keys() - a.keys())]
    out += [
        f"field {p!r} is a {a[p]} in genq's message, a {b[p]} in {who}'s"
        for p in sorted(a.keys() & b.keys())
        if a[p] != b[p]
    ]
    return out


# Fields whose values differ by design between two messages: ids, per-process reply address,
# delivery tag; genq addresses the queue through the default exchange ("") where send_task names
# the queue's own exchange (kombu restores both to the routing key's queue); genq's argsrepr is
# a short summary.
VARYING = {
    "body",
    "headers.id",
    "headers.root_id",
    "headers.argsrepr",
    "headers.origin",
    "properties.correlation_id",
    "properties.reply_to",
    "properties.delivery_tag",
    "properties.delivery_info.exchange",
}


def test_published_message_has_the_layout_send_task_writes(broker: Broker) -> None:
    """genq's publisher builds, field for field, the envelope Celery's ``send_task`` makes kombu
    store: the same fields, of the same types, with the same values where they do not vary."""
    ref = ChunkRef(job_id=JOB, chunk_id="c000000", indices=[0, 1])
    broker.app.send_task(TASK_NAME, args=[ref.model_dump()], task_id=task_id(ref), queue=QUEUE)
    raw = broker.r.rpop(QUEUE)
    assert raw is not None, f"send_task wrote nothing to the list {QUEUE!r}: kombu's queue key changed"
    theirs = json.loads(raw)
    with broker.app.connection_for_write() as conn:
        ours = json.loads(_message(broker.app, conn.default_channel, ref, QUEUE, 0))
    problems = layout_diff(ours, theirs, "send_task")
    assert not problems, "genq's task message no longer matches Celery/kombu's:\n" + "\n".join(problems)
    ours_p, theirs_p = paths(ours), paths(theirs)
    flat = {p: _get(ours, p) for p in ours_p if p not in VARYING}
    want = {p: _get(theirs, p) for p in theirs_p if p not in VARYING}
    changed = [
        f"{p}: genq {flat[p]!r}, send_task {want[p]!r}" for p in sorted(flat) if flat[p] != want.get(p)
    ]
    assert not changed, "genq's task message has other values than send_task's:\n" + "\n".join(changed)
    # what the worker, messages.py and the exporter read from it
    assert ours["headers"]["id"] == task_id(ref) and ours["headers"]["task"] == TASK_NAME
    assert ours["properties"]["delivery_info"]["routing_key"] == QUEUE


def _get(doc: Any, path: str) -> Any:
    for part in path.split("."):
        doc = doc[part] if isinstance(doc, dict) else None
    return doc


def consume(broker: Broker, n: int, *, ack: bool, while_held: Callable[[], None] = lambda: None) -> list[Any]:
    """Take ``n`` messages from QUEUE with a real kombu consumer on the queue as Celery declares
    it, run ``while_held`` while it holds them, then acknowledge them (``ack``) or close the
    connection without (kombu then restores them); returns kombu's messages."""
    got: list[Any] = []
    queue = broker.app.amqp.queues[QUEUE]
    with (
        broker.app.connection_for_read() as conn,
        conn.Consumer([queue], accept=["json"], prefetch_count=n) as consumer,
    ):
        consumer.register_callback(lambda body, message: got.append(message))
        while len(got) < n:
            conn.drain_events(timeout=10)
        while_held()
        for message in got if ack else ():
            message.ack()
    return got


def assert_unacked(broker: Broker, n: int) -> None:
    assert broker.r.hlen(messages.UNACKED) == n, "kombu's consumer did not record its deliveries in unacked"


def test_a_kombu_consumer_takes_genqs_messages_in_order_and_acks_them(broker: Broker) -> None:
    """Messages appended to the job's backlog by the publisher and moved by dispatch.lua are on the
    list kombu consumes, oldest first, decode to the chunk that was published, and ack cleanly."""
    refs = broker.publish(3)
    assert broker.r.llen(QUEUE) == 3, "dispatch.lua did not move the messages onto kombu's list"
    got = consume(broker, 3, ack=True, while_held=lambda: assert_unacked(broker, 3))
    assert [m.headers["id"] for m in got] == [task_id(r) for r in refs], "not consumed oldest first"
    for message, ref in zip(got, refs, strict=True):
        args, kwargs, _embed = message.decode()
        assert ChunkRef.model_validate(args[0]) == ref and kwargs == {}
        assert message.headers["task"] == TASK_NAME
    assert broker.r.llen(QUEUE) == 0
    assert broker.r.hlen("unacked") == 0 and broker.r.zcard("unacked_index") == 0, "ack left kombu state"
    assert messages.message_ids(broker.r, [QUEUE]) == set()


def test_genqs_view_of_unacked_matches_what_a_kombu_consumer_writes(broker: Broker) -> None:
    """A delivered, unacknowledged message sits where messages.py and the exporter look for it, in
    the shape they parse; kombu restores it to its queue (routing key, default exchange)."""
    from kombu.transport.redis import Channel

    assert messages.UNACKED == Channel.unacked_key == exporter.UNACKED, "kombu's unacked hash was renamed"
    assert Channel.sep == exporter.PRIORITY_SEP, "kombu's priority separator changed"
    assert Channel.keyprefix_queue == exporter.BINDINGS + "%s", "kombu's binding keys changed"
    refs = broker.publish(2)

    def held() -> None:
        unacked = broker.r.hgetall(Channel.unacked_key)
        assert len(unacked) == 2 and broker.r.zcard(Channel.unacked_index_key) == 2
        for raw in unacked.values():
            entry = json.loads(raw)
            assert isinstance(entry, list) and len(entry) == 3, (
                f"unacked is no longer [message, EX, RK]: {raw}"
            )
            assert entry[1:] == ["", QUEUE], f"unacked entry's exchange and routing key: {entry[1:]}"
        # messages.py finds them there (a resumed submit publishes none of them again)
        assert messages.message_ids(broker.r, [QUEUE]) == {task_id(r) for r in refs}
        assert broker.r.llen(QUEUE) == 0

    consume(broker, 2, ack=False, while_held=held)
    # closed without acks: kombu restored both to the queue named by their routing key
    assert broker.r.hlen(Channel.unacked_key) == 0 and broker.r.llen(QUEUE) == 2
    assert exporter.queue_depths(broker.r)[QUEUE] == 2
    assert messages.message_ids(broker.r, [QUEUE]) == {task_id(r) for r in refs}
    assert messages.remove_waiting(broker.r, [QUEUE], JOB) == 2 and broker.r.llen(QUEUE) == 0


def test_exporter_counts_queues_through_kombus_bindings(broker: Broker) -> None:
    """An empty queue kombu declared (its list deleted) is reported as 0 from its binding."""
    ref = ChunkRef(job_id=JOB, chunk_id="c000000", indices=[0])
    broker.app.send_task(TASK_NAME, args=[ref.model_dump()], task_id=task_id(ref), queue=QUEUE)
    assert exporter.queue_depths(broker.r) == {QUEUE: 1}
    broker.r.delete(QUEUE)
    assert exporter.queue_depths(broker.r) == {QUEUE: 0}, "kombu's binding set is no longer readable"


# --- peft: the active adapter of a LoRA layer -----------------------------------------------------


def test_setting_active_adapter_is_what_peft_set_adapter_does() -> None:
    """AdapterRouter switches adapters by setting each LoRA layer's ``_active_adapter`` (no
    requires_grad work); peft's own ``set_adapter`` must give the same layers and the same logits."""
    import torch

    from worker.core.profiles import load_profile
    from worker.engine.adapters import AdapterRouter
    from worker.model.loading import load_model

    loaded = load_model(load_profile("tiny-random-multi"), "fp32")
    model = loaded.model
    router = AdapterRouter(model, ["a", "b"])
    assert router.layers, "no peft LoraLayer found in a model with two unmerged adapters"
    ids = torch.tensor([[1, 5, 9, 14, 3]])

    def logits() -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids).logits

    model.base_model.set_adapter("b")  # peft's own switch
    peft_b = logits()
    peft_layers = [list(layer.active_adapters) for layer in router.layers]
    model.base_model.set_adapter("a")
    peft_a = logits()
    assert not torch.equal(peft_a, peft_b), "adapters a and b give the same logits: nothing to compare"
    with router.rows(["b"]):
        assert [list(layer.active_adapters) for layer in router.layers] == peft_layers, (
            "setting LoraLayer._active_adapter no longer switches peft's active adapter"
        )
        torch.testing.assert_close(logits(), peft_b)
    torch.testing.assert_close(logits(), peft_a)
    router.remove()


# --- prometheus-client: a metric's name and type -------------------------------------------------


def test_metric_name_and_type_are_what_prometheus_client_exposes() -> None:
    """metrics.sample_names reads ``metric._name`` and ``metric._type`` and adds the suffixes of
    each type; both must be what prometheus-client itself exposes."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    from worker.queue.metrics import _SUFFIXES, METRICS, sample_names

    for metric in METRICS:
        (family,) = metric.describe()
        assert (metric._name, metric._type) == (family.name, family.type), (
            f"prometheus-client's metric._name/_type changed: {metric._name!r}/{metric._type!r} "
            f"vs {family.name!r}/{family.type!r}"
        )
    registry = CollectorRegistry()
    made = [
        Counter("layout_c", "c", registry=registry),
        Gauge("layout_g", "g", registry=registry),
        Histogram("layout_h", "h", registry=registry),
    ]
    made[0].inc()
    made[1].set(1)
    made[2].observe(1)
    exposed = {s.name for family in registry.collect() for s in family.samples}
    assert sample_names(made) == exposed, (
        f"series names differ: genq expects {sorted(sample_names(made))}, prometheus-client "
        f"exposes {sorted(exposed)}"
    )
    assert set(_SUFFIXES) >= {str(m._type) for m in METRICS}
