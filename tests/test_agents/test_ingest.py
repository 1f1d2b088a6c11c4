"""The ingest stage's pure parts: its lead over the identity agent, pending links, record
sources."""

from __future__ import annotations

from types import SimpleNamespace

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
