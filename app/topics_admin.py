"""Create the service's topics before the worker starts.

Faust declares only the topics its agents consume; topics we only produce to (dead
letters, results, rule matches, late events) would otherwise be auto-created by the
broker on first use, with the broker's default partition count, or not at all where
auto-creation is off (Apache Kafka in production usually). Creating them up front with
``kafka.partitions`` partitions makes every documented topic exist from the start.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

if TYPE_CHECKING:
    from app.faust_app import Runtime

__all__ = ["ensure_topics"]

log = logging.getLogger("emarsys_stream.topics")


def _admin_kwargs(rt: Runtime) -> dict[str, Any]:
    from app.faust_app import _credentials

    k = rt.settings.kafka
    kwargs: dict[str, Any] = {"bootstrap_servers": k.bootstrap_servers}
    creds = _credentials(rt.settings)
    proto = (k.security_protocol or "PLAINTEXT").upper()
    if proto != "PLAINTEXT":
        kwargs["security_protocol"] = proto
        if getattr(creds, "ssl_context", None) is not None:
            kwargs["ssl_context"] = creds.ssl_context
        elif getattr(creds, "context", None) is not None:
            kwargs["ssl_context"] = creds.context
        if proto.startswith("SASL"):
            kwargs["sasl_mechanism"] = k.sasl_mechanism
            kwargs["sasl_plain_username"] = k.sasl_username
            kwargs["sasl_plain_password"] = (
                k.sasl_password.get_secret_value() if k.sasl_password else None
            )
    return kwargs


async def ensure_topics(rt: Runtime) -> list[str]:
    """Create missing topics; returns the names created. Never raises on refusal."""
    names = sorted({t.get_topic_name() for t in vars(rt.topics).values()})
    n = rt.settings.kafka.partitions
    rf = rt.settings.kafka.replication_factor
    admin = AIOKafkaAdminClient(**_admin_kwargs(rt))
    created: list[str] = []
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        missing = [name for name in names if name not in existing]
        for name in missing:
            try:
                await admin.create_topics([NewTopic(name, n, rf)])
                created.append(name)
            except TopicAlreadyExistsError:
                pass
    except Exception as exc:  # e.g. no CREATE ACL: the cluster's operators create them
        log.warning("could not create topics %s: %s", names, exc)
    finally:
        await admin.close()
    if created:
        log.info("created topics: %s", ", ".join(created))
    return created
