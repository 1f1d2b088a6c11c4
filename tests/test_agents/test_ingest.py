"""The ingest stage's pure parts: its lead over the identity agent, pending links, record
sources."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from agents.ingest import IdentityLead, PendingLinks, source_of_record

P0, P1 = ("es.identity", 0), ("es.identity", 1)


def test_lead_counts_written_envelopes_the_identity_agent_has_not_handled() -> None:
    lead = IdentityLead()
    assert lead.of({P0, P1}, {}) == 0
    lead.wrote(P0, 4)
    lead.wrote(P1, 2)
    lead.wrote(P1, 1)  # an older mark never lowers the newest
    assert lead.of({P0, P1}, {}) == 5 + 3
    assert lead.of({P0, P1}, {P0: 4, P1: 0}) == 2
    assert lead.of({P0, P1}, {P0: 9, P1: 5}) == 0


def test_partitions_of_other_workers_do_not_count() -> None:
    lead = IdentityLead()
    lead.of({P0}, {})
    lead.wrote(P1, 100)  # P1 belongs to another worker: its identity agent handles it
    assert lead.of({P0}, {}) == 0


def test_a_partition_that_arrives_with_a_rebalance_starts_from_nothing() -> None:
    # Written while another worker owned it; that worker handled it. This worker's agent
    # never sees those offsets, so waiting for them would stop ingest for good.
    lead = IdentityLead()
    lead.of({P0}, {})
    lead.wrote(P1, 100)
    assert lead.of({P0, P1}, {}) == 0
    lead.wrote(P1, 103)
    assert lead.of({P0, P1}, {P1: 101}) == 2


def test_source_of_a_record_has_no_timestamp_when_the_broker_gave_none() -> None:
    rec = SimpleNamespace(topic="segment.events", partition=2, offset=7, timestamp=-1)
    assert source_of_record(rec) == {  # type: ignore[arg-type]
        "topic": "segment.events", "partition": 2, "offset": 7, "timestamp": None,
    }
    rec.timestamp = 1_764_320_400_000
    assert source_of_record(rec)["timestamp"] == 1_764_320_400_000  # type: ignore[arg-type]


def _partition_of_id(ident: str) -> tuple[str, int]:
    return P1 if ident.endswith("1") else P0


def test_a_link_is_pending_from_routing_until_the_identity_agent_handled_its_envelope() -> None:
    pending = PendingLinks()
    pending.add("user", "u1")
    assert pending.pending(("user", "u1"), {})  # in the batch being routed
    assert not pending.pending(("anonymous", "u1"), {})
    assert not pending.pending(("user", "u0"), {})
    pending.sent({P0: 7, P1: 12}, _partition_of_id, {})
    assert pending.pending(("user", "u1"), {P1: 11, P0: 50})
    assert not pending.pending(("user", "u1"), {P1: 12})
    assert len(pending) == 0  # answered once handled: forgotten


def test_pending_links_are_swept_once_handled_so_ids_that_never_return_are_forgotten() -> None:
    pending = PendingLinks(sweep_at=3)
    for ident in ("u00", "u10", "u20", "u01"):  # three on P0, one on P1
        pending.add("user", ident)
    pending.sent({P0: 5, P1: 9}, _partition_of_id, {P0: 5})  # over 3: P0's are handled
    assert len(pending) == 1
    assert pending.pending(("user", "u01"), {P0: 5})
    assert not pending.pending(("user", "u00"), {})


# -- LocalIdentityLookup: answers only when this worker's identity agent would --------


class _FakeApp:
    """The few things of a Faust app the look-up reads (no broker: unit test)."""

    def __init__(self, assigned: set[Any]) -> None:
        self.rebalancing = False
        self.rebalancing_count = 3
        self.in_recovery = False
        self._assigned = assigned
        self._flow_active = True
        self.flow_control = SimpleNamespace(is_active=lambda: self._flow_active)
        self.consumer = SimpleNamespace(assignment=lambda: self._assigned)
        self.tables = SimpleNamespace(recovery=SimpleNamespace(
            completed=SimpleNamespace(is_set=lambda: True)))


def _lookup_runtime(assigned_partitions: set[int]) -> Any:
    import faust
    from aiokafka import TopicPartition

    tables_app = faust.App("lookup-test", store="memory://", broker="kafka://127.0.0.1:1",
                           key_serializer="raw", value_serializer="raw")
    user_ids = tables_app.Table("user_ids", default=None, key_type=bytes, value_type=bytes)
    anonymous_ids = tables_app.Table("anon_ids", default=None, key_type=bytes,
                                     value_type=bytes)
    topic = "es.identity"
    app = _FakeApp({TopicPartition(topic, p) for p in assigned_partitions}
                   | {TopicPartition("es.contact-events", 0)})
    return SimpleNamespace(
        app=app,
        settings=SimpleNamespace(kafka=SimpleNamespace(partitions=4)),
        topics=SimpleNamespace(identity=SimpleNamespace(get_topic_name=lambda: topic)),
        tables=SimpleNamespace(user_ids=user_ids, anonymous_ids=anonymous_ids),
        state={},
    )


def test_lookup_answers_from_the_tables_of_assigned_partitions_only() -> None:
    from agents.ingest import LocalIdentityLookup
    from app.envelope import partition_of

    ids = [f"user-{i}" for i in range(40)]
    mine = {p for p in range(4) if p % 2 == 0}
    rt = _lookup_runtime(mine)
    for ident in ids:
        rt.tables.user_ids.data[ident.encode()] = f'"{ident}@example.com"'.encode()
    rt.tables.anonymous_ids.data[b"anon-1"] = b'"ann@example.com"'
    lookup = LocalIdentityLookup(rt, PendingLinks())
    for ident in ids:
        expected = f"{ident}@example.com" if partition_of(ident, 4) in mine else None
        assert lookup("user", ident) == expected, ident
    assert lookup("user", "nobody") is None
    anon_expected = "ann@example.com" if partition_of("anon-1", 4) in mine else None
    assert lookup("anonymous", "anon-1") == anon_expected
    assert lookup.resolved["user"] == sum(1 for i in ids if partition_of(i, 4) in mine)


def test_lookup_says_nothing_for_a_pending_link_or_around_a_rebalance() -> None:
    from agents.ingest import LocalIdentityLookup
    from app.envelope import partition_of

    rt = _lookup_runtime({0, 1, 2, 3})
    rt.tables.user_ids.data[b"u1"] = b'"ann@example.com"'
    pending = PendingLinks()
    pending.add("user", "u1")  # a link for u1 in this batch: the table may be old
    assert LocalIdentityLookup(rt, pending)("user", "u1") is None
    tp = ("es.identity", partition_of("u1", 4))
    pending.sent({tp: 10}, lambda ident: tp, {})
    handled: dict[tuple[str, int], int] = rt.state.setdefault(
        "handled_offsets", {}).setdefault("identity", {})
    assert LocalIdentityLookup(rt, pending)("user", "u1") is None  # not handled yet
    handled[tp] = 10
    assert LocalIdentityLookup(rt, pending)("user", "u1") == "ann@example.com"

    app = rt.app
    lookup = LocalIdentityLookup(rt, pending)
    app.rebalancing_count += 1  # a rebalance began and ended during the batch
    assert lookup("user", "u1") is None
    for state in ("rebalancing", "in_recovery", "_flow_active"):
        saved = getattr(app, state)
        setattr(app, state, not saved)
        assert LocalIdentityLookup(rt, pending)("user", "u1") is None, state
        setattr(app, state, saved)
    assert LocalIdentityLookup(rt, pending)("user", "u1") == "ann@example.com"
