"""Parsing and validation of contract records: every bad shape is data, never an exception."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from learners.records import BadRecord, Event, Item, parse_event, parse_item

GOOD = {"event_id": "e-1", "user_id": "42", "item_id": "1193", "event_type": "click", "ts": 978300760.0}


def raw(**changes) -> bytes:
    obj = {**GOOD, **changes}
    return json.dumps({k: v for k, v in obj.items() if v is not _DROP}).encode()


_DROP = object()


def test_good_event_parses():
    assert parse_event(raw()) == Event("e-1", "42", "1193", "click", 978300760.0)


def test_favorite_is_an_alias_and_int_ts_is_accepted():
    event = parse_event(raw(event_type="favorite", ts=5))
    assert event.event_type == "favourite" and event.ts == 5.0


def test_unknown_fields_are_ignored():
    assert isinstance(parse_event(raw(extra={"a": [1, 2]})), Event)


@pytest.mark.parametrize("value, reason", [
    (b"not json", "not_json"),
    (b"[1,2]", "not_an_object"),
    (b'"a string"', "not_an_object"),
    (b"\xff\xfe\x00", "invalid_utf8"),
    (None, "empty_record"),
    (b"{" * 40000 + b"}" * 40000, "oversized"),
    (b"[" * 20000 + b"]" * 20000, "too_deep"),
    (raw(event_id=_DROP), "missing_field"),
    (raw(user_id=_DROP), "missing_field"),
    (raw(item_id=_DROP), "missing_field"),
    (raw(event_type=_DROP), "missing_field"),
    (raw(ts=_DROP), "missing_field"),
    (raw(user_id=42), "wrong_type"),
    (raw(item_id=None), "wrong_type"),
    (raw(event_type=3), "wrong_type"),
    (raw(ts="yesterday"), "wrong_type"),
    (raw(ts=True), "wrong_type"),
    (raw(user_id=""), "empty_id"),
    (raw(item_id="   "), "empty_id"),
    (raw(event_id="x" * 1000), "id_too_long"),
    (raw(event_type="share"), "unknown_event_type"),
    (b'{"event_id":"e","user_id":"u","item_id":"i","event_type":"click","ts":NaN}', "not_json"),
    (b'{"event_id":"e","user_id":"u","item_id":"i","event_type":"click","ts":Infinity}', "not_json"),
    (b'{"event_id":"e","user_id":"u","item_id":"i","event_type":"click","ts":1e999}', "non_finite_ts"),
])
def test_bad_events_become_bad_records(value, reason):
    parsed = parse_event(value)
    assert isinstance(parsed, BadRecord)
    assert parsed.reason == reason
    assert parsed.raw == (value if value is not None else b"")


@pytest.mark.parametrize("field", ["event_id", "user_id", "item_id"])
@pytest.mark.parametrize("value", ["\ud800", "a\udfffb", "line\nbreak", "nul\x00", "bell\x07", "a\u2028b"])
def test_ids_that_later_stages_cannot_carry_are_bad(field, value):
    # A lone surrogate is valid JSON but not UTF-8: it would fail in the uuid5 name, the Kafka
    # key and the checkpoint, after the event was applied (a record that stops the worker for good).
    data = json.dumps({"event_id": "e", "user_id": "u", "item_id": "i", "event_type": "click", "ts": 1.0,
                       field: value}).encode()
    parsed = parse_event(data)
    assert isinstance(parsed, BadRecord) and parsed.reason == "bad_id_chars" and field in parsed.detail
    assert parse_item(json.dumps({"item_id": value, "text": "t"}).encode()).reason == "bad_id_chars"


def test_the_poison_pill_of_a_lone_surrogate_escape_is_a_bad_record():
    raw_event = b'{"event_id":"p","user_id":"\\ud800","item_id":"1","event_type":"click","ts":1.0}'
    assert parse_event(raw_event).reason == "bad_id_chars"


def test_printable_unicode_ids_and_texts_are_good():
    for value in ("caf\u00e9", "\u7528\u6237-7", "\U0001f600", "a b", "item:1/2"):
        event = parse_event(json.dumps({"event_id": value, "user_id": value, "item_id": value,
                                        "event_type": "click", "ts": 1.0}).encode())
        assert isinstance(event, Event) and event.user_id == value
        event.user_id.encode("utf-8")
    assert parse_item(json.dumps({"item_id": "1", "text": "line one\n\tline two"}).encode()).text.startswith("line")


def test_item_text_with_a_lone_surrogate_is_bad():
    assert parse_item(b'{"item_id": "1", "text": "Heat \\ud800 (1995)"}').reason == "bad_text_chars"


def test_items_parse_and_reject_bad_shapes():
    assert parse_item(b'{"item_id": "1", "text": "Heat (1995) | Crime"}') == Item("1", "Heat (1995) | Crime")
    assert parse_item(b'{"item_id": "1"}').reason == "missing_field"
    assert parse_item(b'{"item_id": "1", "text": ""}').reason == "empty_text"
    assert parse_item(b'{"item_id": "", "text": "x"}').reason == "empty_id"
    assert parse_item(b'{"item_id": "1", "text": 5}').reason == "wrong_type"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_parser_never_raises_on_arbitrary_bytes(data):
    for parse in (parse_event, parse_item):
        assert isinstance(parse(data), (Event, Item, BadRecord))


json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["event_id", "user_id", "item_id", "event_type", "ts", "x"]), json_values))
def test_parser_never_raises_on_arbitrary_json_objects(obj):
    data = json.dumps(obj).encode()
    parsed = parse_event(data)
    if isinstance(parsed, Event):
        assert parsed.user_id.strip() and parsed.item_id.strip() and parsed.event_id.strip()
        for value in parsed[:3]:
            value.encode("utf-8")  # every id of a good event can go into keys and uuids
    else:
        assert isinstance(parsed, BadRecord) and parsed.raw == data
