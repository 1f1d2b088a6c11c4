"""`emarsys-stream replay`: move the workers' committed offsets on the ingest topic.

What ``kafka-consumer-groups --reset-offsets`` does, for the workers' ingest consumer
group (``<kafka.app_id>-ingest``) and the ingest topic only, with the checks this
service needs:

1. **No worker may be running.** Both groups of the workers (the ingest group and the
   Faust group ``kafka.app_id``) are described (``DescribeGroups``) and the replay is
   refused while either has members. A commit from outside the group is also
   refused by Apache Kafka itself while the group has members (``UNKNOWN_MEMBER_ID``),
   so a worker that joins between the check and the commit cannot be overwritten.
   Before describing, one ``Heartbeat`` with no member id is sent to the group: Apache
   Kafka answers ``UNKNOWN_MEMBER_ID`` and changes nothing; the embedded broker (Tansu)
   only drops members whose session timed out when the group receives a request of
   this kind, so without it a stopped worker would stay listed forever there.
2. **The plan is shown** per partition: committed offset, target, end, how many
   already processed events are read again and how many unprocessed ones are skipped.
3. **The new offsets are committed** by a consumer of the group that is *assigned*
   the partitions (no group membership, no rebalance; generation -1, as the Kafka
   tool does), and read back with ``committed()``.

Targets (``--to``): ``earliest``, ``latest``, an absolute offset (clamped to each
partition's range, like ``--to-offset``) or an ISO-8601 time with a zone. A time is
looked up with ``offsets_for_times`` and the answer is checked against the records:
a correct broker returns the first record at or after the time (the record before it
is older), or nothing when there is no such record. An answer that contradicts this
(timestamp -1 or earlier than requested, or records that disagree) is refused, never
replayed from: the embedded broker answers with the earliest offset and timestamp -1
for a time after its last record and at record-batch granularity otherwise.

End offsets: the embedded broker reports "base offset of the last record batch + 1",
too low when records were produced in multi-record batches. The real end is taken as
one past the last record actually read from there (on Apache Kafka that is the high
watermark it reports).

Pure parts (parsing, plan, checks, formatting) are plain functions with unit tests;
the async functions at the end talk to Kafka.
"""

from __future__ import annotations

import re
import ssl
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from app.settings import Settings

__all__ = [
    "GroupDescription",
    "GroupMember",
    "PartitionPlan",
    "ReplayError",
    "ReplayTarget",
    "TimeLookupError",
    "build_plan",
    "commit_plan",
    "compute_plan",
    "describe_group",
    "describe_worker_groups",
    "format_members",
    "format_plan",
    "kafka_client_options",
    "parse_group_description",
    "parse_partitions",
    "parse_target",
    "validate_time_answer",
    "verify_time_offset",
]

TargetKind = Literal["earliest", "latest", "offset", "time"]


class ReplayError(Exception):
    """A replay cannot be planned or done; the message says why (and that nothing changed)."""


class TimeLookupError(ReplayError):
    """The broker's answer to a timestamp lookup is not one a correct broker gives."""


# --------------------------------------------------------------------------------------
# --to


@dataclass(frozen=True)
class ReplayTarget:
    """Where to move the committed offsets to."""

    kind: TargetKind
    offset: int | None = None
    time_ms: int | None = None

    def describe(self) -> str:
        if self.kind == "offset":
            return f"offset {self.offset}"
        if self.kind == "time":
            assert self.time_ms is not None
            return f"time {format_time_ms(self.time_ms)}"
        return self.kind


_OFFSET_RE = re.compile(r"[0-9]+")


def parse_target(text: str) -> ReplayTarget:
    """``earliest`` | ``latest`` | a non-negative offset | an ISO-8601 time with a zone.

    Raises ValueError with a message fit for the user.
    """
    value = text.strip()
    if value.lower() in ("earliest", "latest"):
        return ReplayTarget(kind=value.lower())  # type: ignore[arg-type]
    if _OFFSET_RE.fullmatch(value):
        return ReplayTarget(kind="offset", offset=int(value))
    if value.startswith("-") and _OFFSET_RE.fullmatch(value[1:]):
        raise ValueError(f"--to {text!r}: an offset must be >= 0")
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"--to {text!r}: expected earliest, latest, an offset (e.g. 1200) or an "
            "ISO-8601 time with a zone (e.g. 2026-11-28T09:00:00Z)"
        ) from None
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(
            f"--to {text!r}: the time has no zone; add one (Z or +01:00), "
            "e.g. 2026-11-28T09:00:00Z"
        )
    return ReplayTarget(kind="time", time_ms=int(when.timestamp() * 1000))


def format_time_ms(ms: int) -> str:
    dt = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def parse_partitions(text: str | None) -> list[int] | None:
    """``"0,2,5"`` -> [0, 2, 5] (sorted, unique); None or empty -> None (all partitions)."""
    if text is None or not text.strip():
        return None
    out: set[int] = set()
    for part in text.split(","):
        item = part.strip()
        if not _OFFSET_RE.fullmatch(item):
            raise ValueError(
                f"--partitions {text!r}: expected comma-separated partition numbers, e.g. 0,2,5"
            )
        out.add(int(item))
    return sorted(out)


# --------------------------------------------------------------------------------------
# the plan


@dataclass(frozen=True)
class PartitionPlan:
    """One partition of the ingest topic: where the group is and where it will be."""

    partition: int
    committed: int | None
    """The group's committed offset; None when it never committed on this partition."""
    beginning: int
    end: int
    target: int
    clamped: bool = False
    """The requested offset was outside [beginning, end] and was moved to the nearer one."""

    @property
    def position(self) -> int:
        """Where a worker would start now (no commit: the beginning, auto_offset_reset)."""
        if self.committed is None:
            return self.beginning
        return max(self.committed, self.beginning)

    @property
    def rereads(self) -> int:
        """Events already processed that will be processed again."""
        if self.committed is None:
            return 0
        return max(0, self.position - self.target)

    @property
    def skipped(self) -> int:
        """Events not processed yet that the workers will never process (target ahead)."""
        return max(0, self.target - self.position)

    @property
    def changes(self) -> bool:
        return self.committed != self.target


def compute_plan(
    partitions: Iterable[int],
    committed: Mapping[int, int | None],
    beginning: Mapping[int, int],
    end: Mapping[int, int],
    target: ReplayTarget,
    time_offsets: Mapping[int, int | None] | None = None,
) -> list[PartitionPlan]:
    """The target offset of every partition.

    ``time_offsets`` (for a time target) is the checked answer of the broker: the first
    offset at or after the time, or None when no record is that recent (then the end).
    """
    rows: list[PartitionPlan] = []
    for p in sorted(partitions):
        first, last = beginning[p], end[p]
        clamped = False
        if target.kind == "earliest":
            to = first
        elif target.kind == "latest":
            to = last
        elif target.kind == "offset":
            assert target.offset is not None
            to = min(max(target.offset, first), last)
            clamped = to != target.offset
        else:
            if time_offsets is None or p not in time_offsets:
                raise ValueError(f"no time lookup answer for partition {p}")
            found = time_offsets[p]
            to = last if found is None else min(max(found, first), last)
        rows.append(PartitionPlan(p, committed.get(p), first, last, to, clamped))
    return rows


def format_plan(
    rows: Sequence[PartitionPlan], *, topic: str, group: str, target: ReplayTarget
) -> str:
    """The plan as a table for a person."""
    head = ("partition", "committed", "target", "end", "re-read", "skipped")
    body = [
        (
            str(r.partition),
            "-" if r.committed is None else str(r.committed),
            f"{r.target}*" if r.clamped else str(r.target),
            str(r.end),
            str(r.rereads),
            str(r.skipped),
        )
        for r in rows
    ]
    total = ("total", "", "", "", str(sum(r.rereads for r in rows)),
             str(sum(r.skipped for r in rows)))
    widths = [max(len(line[i]) for line in [head, *body, total]) for i in range(len(head))]

    def line(cells: Sequence[str]) -> str:
        return "  " + "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))

    out = [
        f"Replay of topic {topic!r} for consumer group {group!r} to {target.describe()}:",
        line(head),
        *(line(cells) for cells in body),
        line(total),
        "  committed: the group's offset now ('-': none); re-read: events processed again;",
        "  skipped: events not processed yet that the workers will not process.",
    ]
    if any(r.clamped for r in rows):
        out.append("  * the offset was outside the partition's range and was clamped to it.")
    return "\n".join(out)


# --------------------------------------------------------------------------------------
# --to TIME: checking the broker's answer


def validate_time_answer(
    requested_ms: int, answers: Mapping[int, tuple[int, int] | None]
) -> dict[int, int | None]:
    """Check an ``offsets_for_times`` answer: partition -> (offset, timestamp) or None.

    A correct broker answers, per partition, the first offset whose record timestamp is at
    or after ``requested_ms`` together with that timestamp, or nothing (None) when there is
    no such record. Timestamp -1, a timestamp before the requested time or a negative
    offset is an answer it never gives: TimeLookupError names the partitions.
    Returns partition -> offset (None: no record that recent).
    """
    bad: list[str] = []
    out: dict[int, int | None] = {}
    for p in sorted(answers):
        answer = answers[p]
        if answer is None:
            out[p] = None
            continue
        offset, ts = answer
        if ts < 0 or ts < requested_ms or offset < 0:
            bad.append(f"partition {p}: offset {offset} with timestamp {ts}")
        out[p] = offset
    if bad:
        raise TimeLookupError(_time_refusal(requested_ms, bad))
    return out


def verify_time_offset(
    requested_ms: int, partition: int, offset: int, records: Sequence[tuple[int, int]]
) -> None:
    """Check a time lookup answer against the records around it.

    ``records`` are ``(offset, timestamp)`` read from ``offset - 1`` on (from ``offset``
    when it is the first one). The record at ``offset`` must be at or after the time and
    the one just before it (when read) must be older: otherwise the broker's answer is not
    "the first record at or after the time" and TimeLookupError is raised.
    """
    by_offset = dict(records)
    problem = None
    at = by_offset.get(offset)
    before = by_offset.get(offset - 1)
    if at is None:
        problem = f"no record at offset {offset}"
    elif at < requested_ms:
        problem = f"the record at offset {offset} is older ({format_time_ms(at)})"
    elif before is not None and before >= requested_ms:
        problem = (
            f"the record before it, at offset {offset - 1}, is already at or after the "
            f"time ({format_time_ms(before)})"
        )
    if problem is not None:
        raise TimeLookupError(
            _time_refusal(requested_ms, [f"partition {partition}: offset {offset}, but {problem}"])
        )


def _time_refusal(requested_ms: int, details: list[str]) -> str:
    return "\n".join(
        [
            f"refused: the broker's answer to 'first offset at or after "
            f"{format_time_ms(requested_ms)}' (ListOffsets by timestamp) is not one a "
            "correct broker gives:",
            *(f"  - {d}" for d in details),
            "Apache Kafka answers with the first record at or after the time (or with none). "
            "The embedded broker (Tansu) gives answers like this: it does not implement the "
            "lookup correctly, so --to TIME cannot be used with it. Nothing was changed: use "
            "--to earliest, latest or an offset.",
        ]
    )


# --------------------------------------------------------------------------------------
# the group


@dataclass(frozen=True)
class GroupMember:
    member_id: str
    client_id: str
    client_host: str


@dataclass(frozen=True)
class GroupDescription:
    group: str
    state: str
    error_code: int = 0
    members: list[GroupMember] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return bool(self.members)


def parse_group_description(group_id: str, response: Any) -> GroupDescription:
    """The entry for ``group_id`` in a DescribeGroups response (v0-v3 layout).

    Each group entry is ``(error_code, group, state, protocol_type, protocol, members,
    ...)`` and each member ``(member_id, client_id, client_host, metadata, assignment)``.
    """
    groups = list(getattr(response, "groups", None) or [])
    entries = [g for g in groups if len(g) >= 6 and g[1] == group_id]
    if not entries:
        raise ReplayError(
            f"could not tell whether workers of group {group_id!r} are running: the broker's "
            "DescribeGroups answer does not mention the group. Nothing was changed."
        )
    entry = entries[0]
    members = [
        GroupMember(str(m[0] or ""), str(m[1] or ""), str(m[2] or "")) for m in entry[5] or []
    ]
    return GroupDescription(
        group=group_id, state=str(entry[2] or ""), error_code=int(entry[0]), members=members
    )


def format_members(desc: GroupDescription, session_timeout_s: float) -> str:
    """The refusal message for a group that has members."""
    lines = [
        f"refused: consumer group {desc.group!r} has {len(desc.members)} active member(s) "
        f"(state {desc.state}); stop every worker of this deployment first:",
    ]
    for m in desc.members:
        where = " ".join(x for x in (m.client_id, m.client_host) if x)
        lines.append(f"  - {m.member_id}" + (f" ({where})" if where else ""))
    lines.append(
        "A worker stopped just now stays a member until its session times out "
        f"(worker.session_timeout, {session_timeout_s:g}s here): wait and run replay again. "
        "Nothing was changed."
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Kafka


def kafka_client_options(settings: Settings) -> dict[str, Any]:
    """aiokafka client options (servers, TLS, SASL) from the ``kafka`` section."""
    k = settings.kafka
    if not k.bootstrap_servers:
        raise ReplayError("kafka.bootstrap_servers is not set: replay needs the running cluster")
    opts: dict[str, Any] = {
        "bootstrap_servers": [s.strip() for s in k.bootstrap_servers.split(",") if s.strip()],
        "security_protocol": k.security_protocol,
    }
    if k.security_protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=k.ssl_cafile or None)
        if k.ssl_certfile:
            context.load_cert_chain(k.ssl_certfile, k.ssl_keyfile or None)
        opts["ssl_context"] = context
    if k.security_protocol.startswith("SASL"):
        opts["sasl_mechanism"] = k.sasl_mechanism or "PLAIN"
        opts["sasl_plain_username"] = k.sasl_username
        opts["sasl_plain_password"] = (
            k.sasl_password.get_secret_value() if k.sasl_password else None
        )
    return opts


async def describe_worker_groups(settings: Settings) -> GroupDescription:
    """The first of the workers' groups that has members, else the (empty) ingest group."""
    ingest = await describe_group(settings, settings.ingest_group)
    if ingest.active:
        return ingest
    faust_group = await describe_group(settings, settings.kafka.app_id)
    return faust_group if faust_group.active else ingest


async def describe_group(settings: Settings, group: str | None = None) -> GroupDescription:
    """The members of ``group`` (default: the ingest group; see module docstring, step 1)."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.protocol.group import HeartbeatRequest

    group = group or settings.ingest_group
    admin = AIOKafkaAdminClient(**kafka_client_options(settings))
    await admin.start()
    try:
        try:
            node = await admin.find_coordinator(group)
            # No member id, generation -1: Apache Kafka answers UNKNOWN_MEMBER_ID and
            # changes nothing; Tansu drops members whose session has timed out.
            await admin._client.send(node, HeartbeatRequest(group, -1, ""))
        except Exception:
            pass  # only a nudge; DescribeGroups decides
        try:
            [response, *_] = await admin.describe_consumer_groups([group])
        except Exception as exc:
            raise ReplayError(
                f"could not tell whether workers of group {group!r} are running "
                f"(DescribeGroups failed: {exc!r}). Nothing was changed."
            ) from exc
    finally:
        await admin.close()
    desc = parse_group_description(group, response)
    if desc.error_code != 0:
        raise ReplayError(
            f"could not tell whether workers of group {group!r} are running "
            f"(DescribeGroups error code {desc.error_code}). Nothing was changed."
        )
    return desc


async def _read_from(
    consumer: Any,
    starts: Mapping[Any, int],
    *,
    quiet_ms: int = 300,
    first_wait: float = 3.0,
    timeout: float = 15.0,
) -> dict[Any, list[tuple[int, int]]]:
    """``(offset, timestamp)`` of the records from each start offset up to the end.

    Stops at the first empty poll once every partition delivered something (or after
    ``first_wait`` seconds, for a start offset without a readable record).
    """
    if not starts:
        return {}
    tps = list(starts)
    consumer.assign(tps)
    for tp, offset in starts.items():
        consumer.seek(tp, offset)
    out: dict[Any, list[tuple[int, int]]] = {tp: [] for tp in tps}
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        batch = await consumer.getmany(timeout_ms=quiet_ms)
        for tp, records in batch.items():
            out[tp].extend((r.offset, r.timestamp) for r in records)
        if not batch and (
            all(out.values()) or time.monotonic() - started >= first_wait
        ):
            break
    consumer.assign([])
    return out


async def build_plan(
    settings: Settings, target: ReplayTarget, partitions: list[int] | None
) -> list[PartitionPlan]:
    """Read committed, beginning and end offsets (and a time lookup) and compute the plan."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    topic = settings.kafka.ingest_topic
    opts = kafka_client_options(settings)
    reader = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, **opts)
    group = AIOKafkaConsumer(
        group_id=settings.ingest_group, enable_auto_commit=False, **opts
    )
    await reader.start()
    await group.start()
    try:
        await reader.topics()
        known = reader.partitions_for_topic(topic)
        if not known:
            raise ReplayError(f"topic {topic!r} (kafka.ingest_topic) does not exist")
        chosen = sorted(known) if partitions is None else partitions
        unknown = sorted(set(chosen) - set(known))
        if unknown:
            raise ReplayError(
                f"topic {topic!r} has no partition(s) {unknown} "
                f"(it has {len(known)}: 0-{max(known)})"
            )
        tps = {p: TopicPartition(topic, p) for p in chosen}
        beginning_raw = await reader.beginning_offsets(list(tps.values()))
        end_raw = await reader.end_offsets(list(tps.values()))
        beginning = {p: int(beginning_raw[tp]) for p, tp in tps.items()}
        reported_end = {p: int(end_raw[tp]) for p, tp in tps.items()}
        # The real end: one past the last record read from the last reported one.
        tails = await _read_from(
            reader,
            {tp: reported_end[p] - 1 for p, tp in tps.items() if reported_end[p] > beginning[p]},
        )
        end = dict(reported_end)
        for p, tp in tps.items():
            for offset, _ in tails.get(tp, []):
                end[p] = max(end[p], offset + 1)
        committed: dict[int, int | None] = {}
        for p, tp in tps.items():
            committed[p] = await group.committed(tp)
        time_offsets: dict[int, int | None] | None = None
        if target.kind == "time":
            assert target.time_ms is not None
            answer = await reader.offsets_for_times({tp: target.time_ms for tp in tps.values()})
            raw: dict[int, tuple[int, int] | None] = {}
            for p, tp in tps.items():
                found = answer.get(tp)
                raw[p] = None if found is None else (int(found.offset), int(found.timestamp))
            time_offsets = validate_time_answer(target.time_ms, raw)
            around = await _read_from(
                reader,
                {
                    tps[p]: max(off - 1, beginning[p])
                    for p, off in time_offsets.items()
                    if off is not None
                },
            )
            for p, off in time_offsets.items():
                if off is not None:
                    verify_time_offset(target.time_ms, p, off, around.get(tps[p], []))
        return compute_plan(chosen, committed, beginning, end, target, time_offsets)
    finally:
        await group.stop()
        await reader.stop()


async def commit_plan(settings: Settings, rows: Sequence[PartitionPlan]) -> dict[int, int | None]:
    """Commit every row's target for the group and return the offsets read back.

    Raises ReplayError when the broker refuses (e.g. a worker joined meanwhile).
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.errors import CommitFailedError, KafkaError
    from aiokafka.structs import OffsetAndMetadata

    topic = settings.kafka.ingest_topic
    consumer = AIOKafkaConsumer(
        group_id=settings.ingest_group,
        enable_auto_commit=False,
        **kafka_client_options(settings),
    )
    await consumer.start()
    try:
        tps = {r.partition: TopicPartition(topic, r.partition) for r in rows}
        # Assigned, not subscribed: no JoinGroup, the workers' group is not touched.
        consumer.assign(list(tps.values()))
        consumer.pause(*tps.values())
        offsets = {tps[r.partition]: OffsetAndMetadata(r.target, "") for r in rows}
        try:
            await consumer.commit(offsets)
        except CommitFailedError as exc:
            raise ReplayError(
                f"refused by the broker: consumer group {settings.ingest_group!r} has members "
                "now (a worker started meanwhile?). Nothing was changed; stop the workers and "
                "run replay again."
            ) from exc
        except KafkaError as exc:
            raise ReplayError(f"the commit failed: {exc!r}") from exc
        return {p: await consumer.committed(tp) for p, tp in tps.items()}
    finally:
        await consumer.stop()

