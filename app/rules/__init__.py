"""Sequence rules: "A, then B, then no C within 1 h" -> an Emarsys external event (pure).

:func:`parse_rules` compiles the YAML ``rules:`` / ``rule_engine:`` sections into a
:class:`RuleSet`; :class:`RuleEngine` evaluates it per contact on a JSON-serialisable state.

Configuration::

    rules:
      - name: cart_abandonment
        emarsys_event_id: 4711
        within: 2h                 # optional: first matched event .. end of the match
        once_per: 24h              # optional: at most one emitted match per contact per 24 h
        steps:
          - event: Product Viewed  # = {type: track, event: Product Viewed}
            where:
              properties.category: {in: [shoes, boots]}
              properties.price: {gt: 0}
          - event: Product Added
            where: {properties.sku: {eq_step: 0, path: properties.sku}}
          - absent: Order Completed
            for: 1h
        data:
          sku: steps[1].properties.sku
          cart_value: steps[1].properties.value
          source: {value: rules}   # a literal
    rule_engine:
      allowed_lateness: 5m         # default 5m
      max_partial_matches: 100     # per contact and rule, default 100
      late_topic: segment.events.late   # default none

Semantics
---------

Steps. A positive step matches an event by ``type``, ``event`` and ``name`` (each compared for
equality when given; ``event`` without ``type`` implies ``type: track``; ``name`` without
``type`` matches any type carrying that name, i.e. page or screen; at least one of the three is
required) and by ``where``: ``{path: {op: operand, ...}}`` with paths in :mod:`app.paths`
syntax on the Segment event. Several operators in one mapping, and several paths, are ANDed.
A non-mapping value is shorthand for ``eq``. Operators:

* ``eq`` / ``ne``: JSON equality (``1 == 1.0``; booleans only equal booleans). A missing field
  is never ``eq`` and always ``ne``.
* ``gt`` ``gte`` ``lt`` ``lte``: numeric for a number operand, lexicographic for a string
  operand (e.g. ISO dates); a value of another type (or missing) fails.
* ``in`` / ``not_in`` (a list): membership with JSON equality; missing is ``not_in``.
* ``contains``: substring when the value is a string, element (JSON equality) when a list.
* ``exists: true|false``: present and not null / missing or null.
* ``regex``: ``re.search`` on string values (compiled once; anchor with ``^...$``).
* ``eq_step: N`` / ``ne_step: N`` with optional ``path:`` (default: the where key itself):
  compare with that path of the LAST event matched by earlier positive step N. If either side
  is missing, ``eq_step`` fails and ``ne_step`` holds.

Contiguity. ``contiguity: relaxed`` (default): other events of the contact may occur before
each event the step matches. ``strict``: every event the step matches must be the very next
event of the contact after the partial match's previous matched event; otherwise that option is
gone (the partial match is discarded when nothing else can extend it). On the first step
``strict`` only makes sense with ``times``/``at_least`` > 1 (then the repetitions must be
consecutive, e.g. "3 page views in a row"); otherwise it is a config error. ``strict`` right
after an absent step is a config error.

Quantifiers. ``times: n``: the step consumes exactly n matching events, then the next step
starts. ``at_least: n``: greedy with proceed: after n, a further event matching this step keeps
counting (and becomes the step's last event, e.g. for ``data``/``eq_step`` and as the anchor of
a following absence window), while an event matching the next step proceeds; an event matching
both proceeds. A last step with ``at_least: n`` completes as soon as n is reached.

Absent steps: ``absent: <spec>`` (a track event name, or a mapping with
``type``/``event``/``name``/``where``; ``where`` may use ``eq_step`` on earlier steps) and
``for: <duration>``. A rule cannot start with an absent step and two absent steps cannot
follow each other.

* Trailing (``for`` required): the match completes when ``for`` of EVENT time has passed since
  the previous step's last matched event without a matching event. It fires from
  :meth:`RuleEngine.advance_time` (or any later ``on_event``) once the watermark reaches the
  deadline; no further event of the contact is needed.
* Middle with ``for``: the partial match waits; a forbidden event before the deadline discards
  it; at the deadline the absence is satisfied and the next step starts (events before the
  deadline, also ones matching the next step, are ignored).
* Middle without ``for``: a guard: no forbidden event may occur between the previous step and
  the next step's event (an event matching both counts as forbidden).

The window is half-open: a forbidden event at exactly the deadline is too late to cancel it.
After an ``at_least`` step the window runs from that step's latest event and any forbidden
event while the step may proceed discards the partial match.

Time limits. Rule ``within``: from the first matched event to the last matched event or, with
an absent step, the absence deadline (inclusive). A partial match whose absence deadline would
fall after ``first + within`` cannot complete and is discarded (counted as expired) - the
absence is NOT shortened to fit. An ``at_least`` step does not count an extra event that would
push the following absence deadline past ``within``. Step ``within`` (not on the first step):
every event matched by the step must occur within it after the previous step's end (its last
matched event, or the absence deadline when the previous step is an absent step with ``for``).

Event time. Events are applied in ``(ts, message_id)`` order through a per-contact buffer:
``on_event`` buffers the event and applies buffered events with ``ts <= watermark_ms`` and
absence deadlines ``<= watermark_ms`` interleaved in time order (a deadline fires before an
event with the same ts). The caller passes ``watermark = max event time seen on the partition -
allowed_lateness`` (and may advance it when idle). The contact's clock (``state["last_ts"]``) is
the latest applied event time, fired deadline or expiry point; an event older than the clock is
returned with ``late=True`` and not applied (send it to ``late_topic``). Duplicate message ids
(applied or buffered, remembered for ``allowed_lateness`` behind the clock) are ignored.

Matches. Several partial matches per rule may run (every event matching the first step starts
one). When one completes, the oldest completing partial match wins and every partial match that
started at or before its last matched event is discarded (skip past last event). Rules are
independent. ``once_per``: a match whose event time (``RuleMatch.event_time_ms``, the ts of the
last matched positive event) is less than ``once_per`` after the last emitted match of the rule
for the contact is suppressed: counted in ``stats["suppressed"]``, not emitted, it still
consumes its events (skip past last event) and does not extend the suppression window.
``max_partial_matches`` bounds partial matches per contact and rule (oldest dropped, counted);
partial matches expire by ``within`` on events and on the watermark. For an ``at_least`` first
step in a rule without ``within`` an event already counted by an older partial match starts no
new one (the older one dominates it). ``RuleMatch.events`` lists the matched events in order,
at most 100: the first and the latest 99 (only a long ``at_least`` run reaches that).

Irrelevant events. An event that matches no step of any rule (positive or absent, ignoring
``eq_step``/``ne_step``; :meth:`RuleEngine.relevant`) is not stored in rule state unless a
rule has a ``strict`` step (strict contiguity counts every event of the contact): the rules
agent skips it, so it costs no state read or write. It cannot change which matches are
emitted nor their events, data or event times (the argument is in the docstring of
:meth:`RuleEngine.relevant`), but it does not move the contact's clock: it is never reported
late and does not make later events late; an event arriving behind the watermark may thus be
judged late differently than if every event were applied.
"""

from app.rules.engine import EngineResult, RuleEngine, RuleMatch, trigger_id
from app.rules.model import RuleConfigError, RuleSet, parse_rules

__all__ = [
    "EngineResult",
    "RuleConfigError",
    "RuleEngine",
    "RuleMatch",
    "RuleSet",
    "parse_rules",
    "trigger_id",
]
