"""The ingest stage's pure parts: its lead over the identity agent, record sources."""

from __future__ import annotations

from types import SimpleNamespace

from agents.ingest import IdentityLead, source_of_record

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
