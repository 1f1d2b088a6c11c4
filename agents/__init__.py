"""Agents: thin imperative shells around the pure functions in :mod:`app`.

| agent    | reads                | writes                                            |
|----------|----------------------|---------------------------------------------------|
| ingest (*) | ingest topic (raw) | dead letters, identity, contact-events            |
| identity | identity             | contact-events, identity (forwards), dead letters |
| users    | contact-events       | emarsys-operations                                |
| output   | emarsys-operations   | emarsys-results, emarsys-dlq, contact-events      |
| rules    | contact-events       | rule-matches, emarsys-operations, late events     |

(*) not a Faust agent: a service running its own aiokafka consumer (group
``<app_id>-ingest``), because it keeps no state and Faust's per-message cost dominated it.
``identity`` and ``contact-events`` carry envelopes of records (:mod:`app.envelope`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.faust_app import Runtime

__all__ = ["register_all"]


def register_all(rt: Runtime) -> None:
    from agents import identity, ingest, output, rules, users

    ingest.register(rt)
    identity.register(rt)
    users.register(rt)
    output.register(rt)
    rules.register(rt)
