"""The records of docs/formats.md (event, item) and their validation.

Parsing never raises: a bad record is returned as a ``BadRecord`` carrying the
original bytes and a short machine-friendly reason, so callers can dead-letter
it. Bad messages are data, not exceptions.
"""

from __future__ import annotations

import functools
import json
import math
import operator
from dataclasses import dataclass
from typing import NamedTuple, Union

import orjson

EVENT_TYPES = ("click", "favourite", "purchase")
_EVENT_ALIASES = {"favorite": "favourite"}

# How much an interaction says about a user's taste (also the history weight).
EVENT_WEIGHTS = {"click": 1.0, "purchase": 2.0, "favourite": 3.0}

MAX_RECORD_BYTES = 64 * 1024
MAX_ID_CHARS = 256
MAX_TEXT_CHARS = 16 * 1024
MAX_ATTRIBUTES = 32  # keys of an item's attributes, and strings in one list value
MAX_ATTRIBUTE_KEY_CHARS = 64
MAX_ATTRIBUTE_VALUE_CHARS = 256

# Ids end up in Kafka keys, uuid5 names, checkpoint files and logs, all of which need UTF-8.
# JSON can carry what UTF-8 cannot (a lone surrogate escape such as "\ud800"), so an id must be
# printable Unicode (``str.isprintable``: no control, format, surrogate, private-use, unassigned
# or separator characters except the ASCII space); that one C-level test also keeps newlines and
# NULs out of keys and log lines. Texts only need to encode to UTF-8 (the tokenizer reads them).


# Every reason ``parse_event`` / ``parse_item`` can give (dashboards pre-create one series each).
BAD_RECORD_REASONS = ("empty_record", "oversized", "invalid_utf8", "too_deep", "not_json", "not_an_object",
                      "missing_field", "wrong_type", "empty_id", "id_too_long", "bad_id_chars",
                      "unknown_event_type", "non_finite_ts", "empty_text", "bad_text_chars", "bad_attributes")


class Event(NamedTuple):
    """Immutable like the other records; a NamedTuple because one is built per consumed event
    and a frozen dataclass's __init__ would be a large share of that (docs/performance.md)."""

    event_id: str
    user_id: str
    item_id: str
    event_type: str
    ts: float


# Event(...) goes through NamedTuple's Python-level __new__; the fast path builds the same
# tuple directly.
_new_event = functools.partial(tuple.__new__, Event)
# Field readers for batches of events: map() with these runs in C, a per-event loop does not
# (the worker's ingest path and ``ContinualRecommender.observe_many``).
EVENT_ID_OF, USER_ID_OF, ITEM_ID_OF, EVENT_TYPE_OF = (
    operator.attrgetter(name) for name in ("event_id", "user_id", "item_id", "event_type"))


@dataclass(frozen=True, slots=True)
class Item:
    item_id: str
    text: str
    # Structured attributes, sorted by key: (key, value) with value a str, int, float, bool or a
    # tuple of strings. What the encoder reads is ``encoder_text``: text and attributes together.
    attributes: tuple = ()


def encoder_text(item: Item) -> str:
    """What the encoder reads: ``<text> | <value> | <value>`` in the order of the sorted keys (lists
    joined with ", ", booleans as true / false); the text alone without attributes. Values without
    their names: on MovieLens the small encoder ranked names-and-values lower (docs/evaluation.md)."""
    if not item.attributes:
        return item.text
    return " | ".join([item.text] + [_attribute_text(value) for _, value in item.attributes])


def _attribute_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ", ".join(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _attribute_value(value) -> Union[str, int, float, bool, tuple, None]:
    """The attribute value as kept, or None when it is not a JSON scalar or a list of strings."""
    if isinstance(value, int):  # bool is an int too
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return value if len(value) <= MAX_ATTRIBUTE_VALUE_CHARS and _encodes(value) else None
    if isinstance(value, list) and len(value) <= MAX_ATTRIBUTES and all(
            isinstance(v, str) and len(v) <= MAX_ATTRIBUTE_VALUE_CHARS and _encodes(v) for v in value):
        return tuple(value)
    return None


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _attributes(obj: dict, raw: bytes) -> Union[tuple, "BadRecord"]:
    value = obj.get("attributes")
    if value is None:
        return ()
    if not isinstance(value, dict):
        return BadRecord("bad_attributes", raw, "attributes must be a JSON object")
    if len(value) > MAX_ATTRIBUTES:
        return BadRecord("bad_attributes", raw, f"more than {MAX_ATTRIBUTES} attributes")
    kept = []
    for key in sorted(value):
        if not key or len(key) > MAX_ATTRIBUTE_KEY_CHARS or not key.isprintable():
            return BadRecord("bad_attributes", raw, f"attribute names must be 1-{MAX_ATTRIBUTE_KEY_CHARS} "
                                                    "printable characters")
        item = _attribute_value(value[key])
        if item is None:
            return BadRecord("bad_attributes", raw, f"attribute {key!r} must be a string of at most "
                                                    f"{MAX_ATTRIBUTE_VALUE_CHARS} characters, a finite number, "
                                                    f"a boolean or a list of at most {MAX_ATTRIBUTES} such strings")
        kept.append((key, item))
    return tuple(kept)


@dataclass(frozen=True, slots=True)
class BadRecord:
    reason: str
    raw: bytes
    detail: str = ""


def _loads(raw: bytes) -> Union[dict, BadRecord]:
    if raw is None:
        return BadRecord("empty_record", b"", "record value is null (tombstone)")
    if len(raw) > MAX_RECORD_BYTES:
        return BadRecord("oversized", raw, f"{len(raw)} bytes > {MAX_RECORD_BYTES}")
    try:
        # orjson parses straight from bytes, skipping the stdlib's decode + scan; it rejects
        # NaN/Infinity like the stdlib decoder below is told to.
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _loads_slowly(raw)  # names the reason; also takes what orjson refuses but JSON allows
    if not isinstance(obj, dict):
        return BadRecord("not_an_object", raw, type(obj).__name__)
    return obj


def _loads_slowly(raw: bytes) -> Union[dict, BadRecord]:
    """The stdlib path: decodes what orjson refuses but JSON allows (integers beyond 64 bits)
    and tells apart why the rest is bad."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return BadRecord("invalid_utf8", raw, str(exc))
    try:
        obj = _DECODER.decode(text)
    except RecursionError:
        # json's C scanner guards its own recursion; deep input lands here.
        return BadRecord("too_deep", raw, "JSON nesting too deep")
    except ValueError as exc:
        return BadRecord("not_json", raw, str(exc)[:200])
    if not isinstance(obj, dict):
        return BadRecord("not_an_object", raw, type(obj).__name__)
    return obj


def _reject_constant(name: str):
    raise ValueError(f"non-finite number {name}")


# One decoder for every record: json.loads(..., parse_constant=) builds a new decoder per call,
# a large share of parsing an event.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _id_field(obj: dict, name: str, raw: bytes) -> Union[str, BadRecord]:
    if name not in obj:
        return BadRecord("missing_field", raw, name)
    value = obj[name]
    if not isinstance(value, str):
        return BadRecord("wrong_type", raw, f"{name} must be a string")
    if not value.strip():
        return BadRecord("empty_id", raw, name)
    if len(value) > MAX_ID_CHARS:
        return BadRecord("id_too_long", raw, f"{name} longer than {MAX_ID_CHARS}")
    if not value.isprintable():
        return BadRecord("bad_id_chars", raw, f"{name} holds a control, surrogate or other non-printable "
                                               "character; ids must be printable Unicode")
    return value


def parse_event(raw: bytes) -> Union[Event, BadRecord]:
    obj = _loads(raw)
    if isinstance(obj, BadRecord):
        return obj
    # Fast path, a fraction of the step-by-step checks' cost: a well-formed event passes this
    # single test; anything else (int ts, the "favorite" alias, a bad field) takes the checks
    # below, which name why.
    get = obj.get
    event_id, user_id, item_id, event_type, ts = get("event_id"), get("user_id"), get("item_id"), \
        get("event_type"), get("ts")
    if type(event_id) is str and type(user_id) is str and type(item_id) is str and type(event_type) is str \
            and type(ts) is float and event_type in EVENT_WEIGHTS and math.isfinite(ts) \
            and 0 < len(event_id) <= MAX_ID_CHARS and 0 < len(user_id) <= MAX_ID_CHARS \
            and 0 < len(item_id) <= MAX_ID_CHARS \
            and event_id.isprintable() and user_id.isprintable() and item_id.isprintable() \
            and not (event_id.isspace() or user_id.isspace() or item_id.isspace()):
        return _new_event((event_id, user_id, item_id, event_type, ts))
    return _checked_event(obj, raw)


def _checked_event(obj: dict, raw: bytes) -> Union[Event, BadRecord]:
    fields = {}
    for name in ("event_id", "user_id", "item_id"):
        value = _id_field(obj, name, raw)
        if isinstance(value, BadRecord):
            return value
        fields[name] = value
    event_type = obj.get("event_type")
    if event_type is None:
        return BadRecord("missing_field", raw, "event_type")
    if not isinstance(event_type, str):
        return BadRecord("wrong_type", raw, "event_type must be a string")
    event_type = _EVENT_ALIASES.get(event_type, event_type)
    if event_type not in EVENT_WEIGHTS:
        return BadRecord("unknown_event_type", raw, event_type[:40])
    if "ts" not in obj:
        return BadRecord("missing_field", raw, "ts")
    ts = obj["ts"]
    if isinstance(ts, bool) or not isinstance(ts, (int, float)):
        return BadRecord("wrong_type", raw, "ts must be a number")
    ts = float(ts)
    if not math.isfinite(ts):
        return BadRecord("non_finite_ts", raw, repr(ts))
    return Event(event_type=event_type, ts=ts, **fields)


def parse_item(raw: bytes) -> Union[Item, BadRecord]:
    obj = _loads(raw)
    if isinstance(obj, BadRecord):
        return obj
    item_id = _id_field(obj, "item_id", raw)
    if isinstance(item_id, BadRecord):
        return item_id
    if "text" not in obj:
        return BadRecord("missing_field", raw, "text")
    text = obj["text"]
    if not isinstance(text, str):
        return BadRecord("wrong_type", raw, "text must be a string")
    if not text.strip():
        return BadRecord("empty_text", raw, "text")
    text = text[:MAX_TEXT_CHARS]
    if not _encodes(text):
        return BadRecord("bad_text_chars", raw, "text holds a lone surrogate escape; it must be valid Unicode")
    attributes = _attributes(obj, raw)
    if isinstance(attributes, BadRecord):
        return attributes
    return Item(item_id=item_id, text=text, attributes=attributes)


def event_to_json(event: Event) -> bytes:
    return json.dumps(
        {"event_id": event.event_id, "user_id": event.user_id, "item_id": event.item_id,
         "event_type": event.event_type, "ts": event.ts}
    ).encode()


def item_to_json(item: Item) -> bytes:
    record = {"item_id": item.item_id, "text": item.text}
    if item.attributes:
        record["attributes"] = {k: list(v) if isinstance(v, tuple) else v for k, v in item.attributes}
    return json.dumps(record).encode()
