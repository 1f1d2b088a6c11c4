"""Every Faust table of the service, in one place.

All tables are changelog-backed, use the configured store (RocksDB by default,
``memory://`` allowed) and have bytes keys/values (see :mod:`tables.codec`).

| table            | key                 | value (orjson)                          | written by | partitioned like |
|------------------|---------------------|-----------------------------------------|------------|------------------|
| users            | primary key         | :class:`app.identity.UserRecord` dict   | users      | contact-events   |
| anonymous_ids    | anonymousId         | primary key (JSON string)               | identity   | identity         |
| user_ids         | userId              | primary key (JSON string)               | identity   | identity         |
| held_events      | anonymousId/userId  | index of its held events (app.held)     | identity   | identity         |
| held_event_items | id + NUL + seq      | one held normalised event               | identity   | identity (by id) |
| rule_state       | primary key         | rule engine state (partials, buffer)    | rules      | contact-events   |

``contact-events`` is keyed by primary key, ``identity`` by the anonymousId/userId,
so each lookup table is partitioned by its own key and the users table by primary key.
The messageIds of the dedupe window live in each contact's users record (``seen``);
earlier versions had a ``dedupe`` table, which is no longer read or written.
"""

from __future__ import annotations

from dataclasses import dataclass

import faust

from tables.store_options import StoreOptions

__all__ = ["Tables", "define_tables"]


@dataclass(frozen=True)
class Tables:
    users: faust.Table
    anonymous_ids: faust.Table
    user_ids: faust.Table
    held_events: faust.Table
    held_event_items: faust.Table
    rule_state: faust.Table


def _table(
    app: faust.App, name: str, partitions: int, help_: str, memory: StoreOptions
) -> faust.Table:
    return app.Table(  # type: ignore[return-value]
        name,
        default=None,
        partitions=partitions,
        # bytes in, bytes out: serializers come from the app (key/value_serializer="raw")
        key_type=bytes,
        value_type=bytes,
        help=help_,
        # A fresh dict per table: Faust's RocksDB store pops keys from it. Ignored by the
        # memory store.
        options=memory.rocksdb_options(),
    )


def define_tables(
    app: faust.App, partitions: int, memory: StoreOptions | None = None
) -> Tables:
    m = memory or StoreOptions()
    return Tables(
        users=_table(app, "users", partitions, "Intermediate users table, by primary key", m),
        anonymous_ids=_table(
            app, "anonymous_ids", partitions, "anonymousId -> primary key", m
        ),
        user_ids=_table(app, "user_ids", partitions, "userId -> primary key", m),
        held_events=_table(
            app, "held_events", partitions, "index of events waiting for an identity", m
        ),
        held_event_items=_table(
            app, "held_event_items", partitions, "events waiting for an identity", m
        ),
        rule_state=_table(app, "rule_state", partitions, "rule builder partial matches", m),
    )
