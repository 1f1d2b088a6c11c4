"""Output agent: Emarsys operations -> batched, rate-limited, retried Emarsys API calls.

Offsets of an operation are committed only after Emarsys accepted it or it was
dead-lettered: each event read is held (``message.incref()``, Faust's own
reference count for messages shared by several streams) while its operation waits
in :class:`~app.pending.PendingContacts`, and acked only after the call that carried
it finished. The client retries transient failures until they succeed, so a
waiting operation blocks nothing but its own offset.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson

from agents.emit import send_json
from app.emarsys.batching import (
    ContactChange,
    ContactUpsertBatcher,
    TriggerBatcher,
    TriggerRequest,
)
from app.emarsys.client import CallResult, EmarsysClient
from app.emarsys.factory import emarsys_client_from_settings
from app.pending import PendingOperations

if TYPE_CHECKING:
    from app.faust_app import Runtime

__all__ = ["register"]

log = logging.getLogger("emarsys_stream.output")


def register(rt: Runtime) -> None:
    s = rt.settings
    m = rt.metrics
    topics = rt.topics

    async def record_result(result: CallResult, contacts: int) -> None:
        outcome = "ok" if result.ok else "permanent_error"
        m.emarsys_calls.labels(result.endpoint, outcome).inc()
        m.emarsys_latency.labels(result.endpoint).observe(result.latency_seconds)
        for reason, n in (result.retries_by_reason or {}).items():
            if n:
                m.emarsys_retries.labels(reason).inc(n)
        await send_json(
            topics.results,
            None,
            {
                "endpoint": result.endpoint,
                "method": result.method,
                "path": result.path,
                "status": result.status,
                "reply_code": result.reply_code,
                "reply_text": result.reply_text,
                "ok": result.ok,
                "contacts": contacts,
                "errors": len(result.contact_errors or {}),
                "attempts": result.attempts,
                "latency_ms": round(result.latency_seconds * 1000, 1),
                "at_ms": int(time.time() * 1000),
            },
        )

    async def dead_letter(
        endpoint: str,
        request: dict[str, Any],
        result: CallResult | None,
        primary_keys: list[str],
        errors: dict[str, Any] | None,
    ) -> None:
        m.emarsys_dead_letters.labels(endpoint).inc(len(primary_keys))
        await send_json(
            topics.emarsys_dead_letters,
            primary_keys[0] if len(primary_keys) == 1 else None,
            {
                "endpoint": endpoint,
                "primary_keys": primary_keys,
                "request": request,
                "response": None
                if result is None
                else {
                    "status": result.status,
                    "reply_code": result.reply_code,
                    "reply_text": result.reply_text,
                    "errors": errors,
                },
                "errors": errors,
                "at_ms": int(time.time() * 1000),
            },
        )

    async def feedback(pk: str, fields: dict[str, Any], contact_missing: bool) -> None:
        # Tell the users agent the values were not stored, so they are sent again later.
        await send_json(
            topics.contact_events,
            pk,
            {
                "kind": "send_failed",
                "primary_key": pk,
                "fields": fields,
                "contact_missing": contact_missing,
            },
        )

    @rt.app.agent(topics.operations, name="output")
    async def output(stream):  # type: ignore[no-untyped-def]
        pending: PendingOperations[Any] = PendingOperations(
            s.emarsys.batch_size, s.emarsys.flush_interval, time.monotonic
        )
        lock = asyncio.Lock()
        tick = max(0.01, min(0.1, s.emarsys.flush_interval / 4))

        async def flush_due(client: EmarsysClient) -> None:
            async with lock:
                while pending.due():
                    drained = pending.drain()
                    # Upserts first: a new contact must exist before its first trigger.
                    for key_id, changes in drained.upserts_by_key_id.items():
                        await upsert(client, key_id, changes)
                    if drained.triggers:
                        await trigger(client, drained.triggers)
                    for ev in drained.tokens:
                        await stream.ack(ev)

        async def flush_by_age(client: EmarsysClient) -> None:
            # take_events only wakes up on new events; age-based flushes need a clock.
            while True:
                await asyncio.sleep(tick)
                try:
                    await flush_due(client)
                except Exception:
                    log.exception("flush of pending Emarsys operations failed")
                    raise

        async with emarsys_client_from_settings(s) as client:
            ticker = asyncio.create_task(flush_by_age(client))
            try:
                async for events in stream.take_events(s.worker.output_batch_max, tick):
                    async with lock:
                        for ev in events:
                            await accept(pending, ev)
                    if ticker.done():
                        ticker.result()  # re-raise a flusher crash into the agent
                    await flush_due(client)
            finally:
                ticker.cancel()

    async def accept(pending: PendingOperations[Any], ev: Any) -> None:
        try:
            op = orjson.loads(ev.value)
            kind = op.get("op")
            if kind == "contact_upsert":
                change = ContactChange(op["primary_key"], op["fields"], int(op["event_time_ms"]))
                ev.message.incref()  # released by stream.ack() once the call is done
                pending.add_upsert(str(op["key_id"]), change, ev)
                return
            if kind == "event_trigger":
                request = TriggerRequest(
                    event_id=int(op["event_id"]),
                    key_id=str(op["key_id"]),
                    external_id=str(op["primary_key"]),
                    data=op.get("data") or None,
                    trigger_id=op.get("trigger_id"),
                    event_time=op.get("event_time"),
                )
                ev.message.incref()
                pending.add_trigger(request, ev)
                return
            raise ValueError(f"unknown operation {kind!r}")
        except (ValueError, KeyError, TypeError) as exc:
            # Never dropped silently: an operation we cannot read is dead-lettered.
            m.emarsys_dead_letters.labels("unreadable").inc()
            await send_json(
                topics.emarsys_dead_letters,
                None,
                {"endpoint": "unreadable", "primary_keys": [], "error": str(exc),
                 "raw": ev.value.decode("utf-8", "replace"), "at_ms": int(time.time() * 1000)},
            )

    async def trigger(client: EmarsysClient, requests: list[TriggerRequest]) -> None:
        plan = TriggerBatcher(max_contacts=s.emarsys.batch_size).plan(requests)
        for req in plan.oversize:
            await refuse_triggers([req], None, {"oversize": "over 1 MB"})
        for batch in plan.batches:
            result = await client.trigger_event(batch.event_id, batch.key_id, batch.contacts)
            await record_result(result, len(batch.contacts))
            errors = result.contact_errors or {}
            if result.ok and not errors:
                continue
            by_id = {r.external_id: r for r in batch.requests}
            if not result.ok or any(k not in by_id for k in errors):
                await refuse_triggers(batch.requests, result, errors or None)
                continue
            missing = [by_id[k] for k, e in errors.items() if "2008" in e]
            other = [by_id[k] for k, e in errors.items() if "2008" not in e]
            if other:
                await refuse_triggers(other, result, {r.external_id: errors[r.external_id]
                                                      for r in other})
            if missing:
                await retry_after_creating(client, batch.event_id, batch.key_id, missing)

    async def retry_after_creating(
        client: EmarsysClient, event_id: int, key_id: str, requests: list[TriggerRequest]
    ) -> None:
        """Contacts Emarsys does not know (2008): create them, then retry once."""
        created = await client.upsert_contacts(
            key_id, [{key_id: r.external_id} for r in requests]
        )
        await record_result(created, len(requests))
        result = await client.trigger_event(event_id, key_id, [r.contact() for r in requests])
        await record_result(result, len(requests))
        errors = result.contact_errors or {}
        if result.ok and not errors:
            return
        failed = requests if not result.ok else [r for r in requests if r.external_id in errors]
        await refuse_triggers(failed or requests, result, errors or None)

    async def refuse_triggers(
        requests: list[TriggerRequest], result: CallResult | None, errors: dict[str, Any] | None
    ) -> None:
        for r in requests:
            await dead_letter(
                "event_trigger",
                {"event_id": r.event_id, "key_id": r.key_id, "contacts": [r.contact()]},
                result,
                [r.external_id],
                errors,
            )

    async def upsert(client: EmarsysClient, key_id: str, changes: list[ContactChange]) -> None:
        batcher = ContactUpsertBatcher(key_id, max_contacts=s.emarsys.batch_size)
        plan = batcher.plan(changes)
        for contact in plan.oversize:
            # Larger than one request may be: Emarsys can never accept it.
            await refuse("contact_upsert", key_id, [contact], None, {"oversize": "over 8 MB"})
        for contacts in plan.batches:
            result = await client.upsert_contacts(key_id, contacts)
            await record_result(result, len(contacts))
            errors = result.contact_errors or {}
            if result.ok and not errors:
                continue
            by_pk = {str(c.get(key_id)): c for c in contacts}
            if not result.ok or any(k not in by_pk for k in errors):
                # A batch-wide refusal (HTTP 4xx, replyCode != 0, or an error under a
                # pseudo key such as <NO_KEY_ID>): the whole batch is dead-lettered.
                await refuse("contact_upsert", key_id, contacts, result, errors or None)
                continue
            failed = [by_pk[k] for k in errors]
            await refuse("contact_upsert", key_id, failed, result, errors)

    async def refuse(
        endpoint: str,
        key_id: str,
        contacts: list[dict[str, Any]],
        result: CallResult | None,
        errors: dict[str, Any] | None,
    ) -> None:
        pks = [str(c.get(key_id)) for c in contacts]
        await dead_letter(endpoint, {"key_id": key_id, "contacts": contacts}, result, pks, errors)
        for c in contacts:
            fields = {f: v for f, v in c.items() if f != key_id}
            await feedback(str(c.get(key_id)), fields, contact_missing=True)
