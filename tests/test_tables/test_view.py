"""TableView on its own (memory store): reads once per batch, get/in/[] agree on absence."""

from __future__ import annotations

from typing import Any

import faust
import pytest

from tables.view import TableView


@pytest.fixture
def table() -> Any:
    app = faust.App(
        "view-test", store="memory://", broker="kafka://127.0.0.1:1",
        key_serializer="raw", value_serializer="raw",
    )
    return app.Table("things", default=None, key_type=bytes, value_type=bytes)


def test_absent_key_reads_as_absent_through_get_in_and_index(table: Any) -> None:
    view = TableView(table, {})
    assert view.get("nobody") is None
    assert view.get("nobody", "fallback") == "fallback"
    assert "nobody" not in view
    with pytest.raises(KeyError):
        view["nobody"]  # noqa: B018


def test_a_stored_value_is_read_once_per_batch_and_writes_stay_in_the_batch(
    table: Any,
) -> None:
    table.data[b"ann"] = b'{"n":1}'
    view = TableView(table, {})
    assert view.get("ann") == {"n": 1}
    table.data[b"ann"] = b'{"n":2}'  # not read again within the batch
    assert view["ann"] == {"n": 1} and "ann" in view
    view["ann"] = {"n": 3}
    view["bob"] = {"n": 4}
    assert view.get("ann") == {"n": 3} and view.get("bob") == {"n": 4}
    del view["bob"]
    assert view.get("bob") is None and "bob" not in view
    assert view.dirty_count == 2
    assert table.data[b"ann"] == b'{"n":2}'  # nothing written before flush
