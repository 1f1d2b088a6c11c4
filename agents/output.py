"""Output agent: Emarsys operations -> batched, rate-limited, retried Emarsys API calls.

Offsets of an operation are committed only after Emarsys accepted it or it was
dead-lettered: each event read is held (``message.incref()``, Faust's own
reference count for messages shared by several streams) while its operation waits
in :class:`~app.pending.PendingOperations`, and acked only after the call that carried
it finished. The client retries transient failures until they succeed, so a
waiting operation blocks nothing but its own offset.

A flush sends upserts first, then triggers, then contact-list calls (a list add needs
the contact to exist). Lists named in the config (``contact_list_name``) are looked up
with ``GET contactlist`` the first time they are needed and their id remembered for the
life of the worker; with ``create_missing`` a list not found is created once
(``POST contactlist``). Looking up first means a restarted worker finds the list it
created before instead of creating a duplicate.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson

from agents.emit import send_json, send_records
from app.audiences import LIST_OP, ListOperation
from app.emarsys.batching import (
    ContactChange,
    ContactUpsertBatcher,
    ListBatch,
    ListMembershipBatcher,
    ListMembershipChange,
    TriggerBatcher,
    TriggerRequest,
)
from app.emarsys.client import MAX_LIST_IDS_PER_CALL, CallResult, EmarsysClient
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

    def count_retry(endpoint: str, reason: str) -> None:
        m.emarsys_retries.labels(reason).inc()
        if reason == "429":
            m.emarsys_429.labels(endpoint).inc()

    async def record_result(result: CallResult, contacts: int) -> None:
        outcome = "ok" if result.ok else "permanent_error"
        m.emarsys_calls.labels(result.endpoint, outcome).inc()
        m.emarsys_latency.labels(result.endpoint).observe(result.latency_seconds)
        # Retries (and retried 429s) are counted live by on_retry; only a final 429 that
        # was not retried is left to count here.
        if result.status == 429 and not result.ok:
            m.emarsys_429.labels(result.endpoint).inc()
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
        log.warning(
            "emarsys dead letter written: %d contact(s) refused by %s",
            len(primary_keys),
            endpoint,
            extra={"endpoint": endpoint, "contacts": len(primary_keys),
                   "status": None if result is None else result.status,
                   "reply_code": None if result is None else result.reply_code},
        )
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

    async def feedback(
        pk: str,
        fields: dict[str, Any],
        contact_missing: bool,
        audiences: dict[str, str] | None = None,
    ) -> None:
        # Tell the users agent the values were not stored, so they are sent again later.
        msg: dict[str, Any] = {
            "kind": "send_failed",
            "primary_key": pk,
            "fields": fields,
            "contact_missing": contact_missing,
        }
        if audiences:
            msg["audiences"] = audiences  # audience -> the refused action ("add"/"delete")
        await send_records(topics.contact_events, [(pk, msg)], s.kafka.partitions)

    @rt.app.agent(topics.operations, name="output")
    async def output(stream):  # type: ignore[no-untyped-def]
        pending: PendingOperations[Any] = PendingOperations(
            s.emarsys.batch_size,
            s.emarsys.flush_interval,
            time.monotonic,
            list_batch_size=MAX_LIST_IDS_PER_CALL,
        )
        lock = asyncio.Lock()
        tick = max(0.01, min(0.1, s.emarsys.flush_interval / 4))

        async def flush_due(client: EmarsysClient) -> None:
            async with lock:
                while pending.due():
                    drained = pending.drain()
                    count_minimum_calls(drained)
                    # Upserts first: a new contact must exist before its first trigger.
                    for key_id, changes in drained.upserts_by_key_id.items():
                        await upsert(client, key_id, changes)
                    if drained.triggers:
                        await trigger(client, drained.triggers)
                    if drained.list_changes:
                        await send_lists(client, drained.list_changes)
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

        async with emarsys_client_from_settings(s, on_retry=count_retry) as client:
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

    def count_minimum_calls(drained: Any) -> None:
        size = s.emarsys.batch_size
        upserts = sum(
            -(-len({c.primary_key for c in changes}) // size)
            for changes in drained.upserts_by_key_id.values()
        )
        per_event: dict[tuple[int, str], set[str]] = {}
        for r in drained.triggers:
            per_event.setdefault((r.event_id, r.key_id), set()).add(r.external_id)
        triggers = sum(-(-len(ids) // size) for ids in per_event.values())
        if upserts:
            m.emarsys_minimum_calls.labels("contact.upsert").inc(upserts)
        if triggers:
            m.emarsys_minimum_calls.labels("event.trigger").inc(triggers)

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
            if kind == LIST_OP:
                operation = ListOperation.from_op(op)
                ev.message.incref()
                pending.add_list_change(operation, ev)
                return
            raise ValueError(f"unknown operation {kind!r}")
        except (ValueError, KeyError, TypeError) as exc:
            # Never dropped silently: an operation we cannot read is dead-lettered.
            m.emarsys_dead_letters.labels("unreadable").inc()
            log.warning("emarsys dead letter written: unreadable operation (%s)", exc,
                        extra={"endpoint": "unreadable", "contacts": 0})
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

    # ------------------------------------------------------------------ contact lists

    #: list name -> id, for the life of the worker (looked up once, created at most once).
    list_ids: dict[str, int] = {}

    def lists_by_name(result: CallResult) -> dict[str, int]:
        out: dict[str, int] = {}
        items = result.data if isinstance(result.data, list) else []
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                continue
            try:
                list_id = int(item["id"])
            except (KeyError, TypeError, ValueError):
                continue
            name = item["name"]
            if name not in out or list_id < out[name]:  # duplicate names: the oldest list
                out[name] = list_id
        return out

    async def resolve_lists(
        client: EmarsysClient, changes: list[ListOperation]
    ) -> dict[str, tuple[CallResult | None, str]]:
        """Fill ``list_ids`` for every list named in ``changes``; names that stay unknown
        -> (the call that failed or None, why)."""
        wanted: dict[str, bool] = {}
        key_ids: dict[str, str] = {}
        for c in changes:
            if c.list_id is None and c.list_name is not None and c.list_name not in list_ids:
                wanted[c.list_name] = wanted.get(c.list_name, False) or c.create_missing
                key_ids.setdefault(c.list_name, c.key_id)
        if not wanted:
            return {}
        failed: dict[str, tuple[CallResult | None, str]] = {}
        listed = await client.list_lists()
        await record_result(listed, 0)
        if not listed.ok:
            why = f"GET contactlist failed: {listed.error}"
            return {name: (listed, why) for name in wanted}
        found = lists_by_name(listed)
        for name, create in wanted.items():
            if name in found:
                list_ids[name] = found[name]
                continue
            if not create:
                failed[name] = (None, f"no contact list named {name!r} (create_missing is off)")
                continue
            created = await client.create_list(name, key_ids[name])
            await record_result(created, 0)
            data = created.data if isinstance(created.data, dict) else {}
            new_id = data.get("id")
            if created.ok and isinstance(new_id, int) and not isinstance(new_id, bool):
                log.info("created contact list %r (id %s)", name, new_id)
                list_ids[name] = new_id
                continue
            # Another worker may have created it meanwhile: look once more.
            again = await client.list_lists()
            await record_result(again, 0)
            if again.ok and name in lists_by_name(again):
                list_ids[name] = lists_by_name(again)[name]
            else:
                failed[name] = (created, f"POST contactlist failed: {created.error}")
        return failed

    async def send_lists(client: EmarsysClient, changes: list[ListOperation]) -> None:
        unresolved = await resolve_lists(client, changes)
        by_slot: dict[tuple[int, str, str], ListOperation] = {}
        resolved: list[ListMembershipChange] = []
        refused: dict[tuple[str, str], list[ListOperation]] = {}
        # Later event time last, so the batcher's "last change wins" is "later event wins"
        # also when one list is named by id and by name.
        for c in sorted(changes, key=lambda c: c.event_time_ms):
            list_id = c.list_id if c.list_id is not None else list_ids.get(c.list_name or "")
            if list_id is None:
                refused.setdefault((c.list_name or "", c.action), []).append(c)
                continue
            by_slot[(list_id, c.key_id, c.primary_key)] = c
            resolved.append(ListMembershipChange(list_id, c.key_id, c.primary_key, c.action))
        for (name, action), ops in refused.items():
            # A list that cannot be found (or created): a permanent error for these ids.
            result, why = unresolved.get(name, (None, f"no contact list named {name!r}"))
            await refuse_list_changes(action, {"list_name": name}, ops, result, {"list": why},
                                      contact_missing=False)
        for batch in ListMembershipBatcher(max_ids=MAX_LIST_IDS_PER_CALL).batches(resolved):
            await send_list_batch(client, batch, by_slot)

    async def send_list_batch(
        client: EmarsysClient,
        batch: ListBatch,
        by_slot: dict[tuple[int, str, str], ListOperation],
    ) -> None:
        if batch.action == "add":
            result = await client.add_to_list(batch.list_id, batch.key_id, batch.external_ids)
        else:
            result = await client.remove_from_list(
                batch.list_id, batch.key_id, batch.external_ids
            )
        await record_result(result, len(batch.external_ids))
        errors = result.contact_errors or {}
        if result.ok and not errors:
            return
        ops = [by_slot[(batch.list_id, batch.key_id, x)] for x in batch.external_ids]
        sent = set(batch.external_ids)
        where: dict[str, Any] = {"list_id": batch.list_id}
        if not result.ok and result.reply_code == 3004:
            # The list is gone (deleted in Emarsys): look its name up again next time.
            for name, list_id in list(list_ids.items()):
                if list_id == batch.list_id:
                    del list_ids[name]
        if not result.ok or any(k not in sent for k in errors):
            # Batch-wide refusal: every id of the call is dead-lettered.
            await refuse_list_changes(batch.action, where, ops, result, errors or None,
                                      contact_missing=False)
            return
        failed = [o for o in ops if o.primary_key in errors]
        missing = [o for o in failed if "2008" in errors[o.primary_key]]
        other = [o for o in failed if "2008" not in errors[o.primary_key]]
        for group, contact_missing in ((missing, True), (other, False)):
            if group:
                await refuse_list_changes(
                    batch.action, where, group, result,
                    {o.primary_key: errors[o.primary_key] for o in group},
                    contact_missing=contact_missing,
                )

    async def refuse_list_changes(
        action: str,
        where: dict[str, Any],
        ops: list[ListOperation],
        result: CallResult | None,
        errors: dict[str, Any] | None,
        *,
        contact_missing: bool,
    ) -> None:
        """Dead-letter refused list changes (one envelope per call) and tell the users
        agent, so the next signal for the audience tries again."""
        key_id = ops[0].key_id
        await dead_letter(
            f"contactlist.{action}",
            {**where, "key_id": key_id, "external_ids": [o.primary_key for o in ops],
             "audiences": sorted({o.audience for o in ops})},
            result,
            [o.primary_key for o in ops],
            errors,
        )
        for o in ops:
            await feedback(o.primary_key, {}, contact_missing, {o.audience: o.action})
