"""The embedded default: what `emarsys-stream run` uses when given no config file."""

from __future__ import annotations

SIMULATOR_USERNAME = "sim-user"
SIMULATOR_SECRET = "sim-secret"  # the simulator's own demo account, not a real secret

DEFAULT_CONFIG_YAML = """
kafka:
  ingest_topic: segment.events
  dead_letter_topic: segment.events.dlq
  partitions: 4
emarsys:
  auth:
    type: wsse
    username: "${EMARSYS_USERNAME:-sim-user}"
    secret: "${EMARSYS_SECRET:-sim-secret}"
  requests_per_minute: 1000
  batch_size: 1000
  flush_interval: 1.0
identity:
  primary_key:
    paths: [traits.email, context.traits.email, properties.email]
    field_id: 3
    normalize: [trim, lowercase]
data_map:
  - {from: traits.firstName, field_id: 1}
  - {from: traits.lastName, field_id: 2}
  - {from: [traits.optIn, context.traits.optIn], field_id: 31, transform: optin}
  - {from: traits.birthday, field_id: 4, transform: date}
store: "rocksdb://"
data_dir: ".emarsys-stream/data"
"""
