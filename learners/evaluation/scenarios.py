"""Evaluation scenarios: the same events in another order, so P1 measures something else.

``time`` is the stream as it happened (P1 as docs/formats.md defines it).

``genre-epochs`` is a drift scenario: items are grouped by their first genre
(the ``genres`` attribute, or a text ``Title (year) | Genre, Genre``; MovieLens
lists genres in alphabetical order, so the first is a stable label), genres are dealt into
``epochs`` groups of about equal event counts, and the stream plays one group
after the other, each in its own time order. What was learned on an early
epoch is not seen again later, so a learner that forgets shows it in BWT.
Timestamps are replaced by the new position, so P1's sort keeps this order.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

from learners.records import Event, Item

SCENARIOS = ("time", "genre-epochs")
GENRE_EPOCHS = 5


def genre_of(text: str) -> str:
    """First genre of a ``Title | Genre, Genre`` text ('' when there is none)."""
    if "|" not in text:
        return ""
    _, _, genres = text.partition(" | ") if " | " in text else text.partition("|")
    return genres.replace("|", ",").split(",")[0].strip()


def genre_of_item(item: Item) -> str:
    """First of the item's ``genres`` attribute, else the first genre of its text."""
    genres = dict(item.attributes).get("genres")
    if isinstance(genres, tuple) and genres:
        return genres[0]
    return genre_of(item.text)


def genre_epochs(events: Sequence[Event], items: Sequence[Item], epochs: int = GENRE_EPOCHS) -> list[Event]:
    genre = {item.item_id: genre_of_item(item) for item in items}
    sizes = Counter(genre.get(e.item_id, "") for e in events)
    # Largest genres first, each to the epoch with the fewest events so far: balanced epochs,
    # the same for the same data (ties broken by name).
    load = [0] * epochs
    epoch_of: dict[str, int] = {}
    for name, size in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])):
        target = min(range(epochs), key=lambda e: (load[e], e))
        epoch_of[name] = target
        load[target] += size
    # Epochs in order of their earliest event, so the first epoch starts where the stream does.
    ordered = sorted(events, key=lambda e: e.ts)  # stable: ts ties keep file order
    first: dict[int, int] = {}
    for position, event in enumerate(ordered):
        first.setdefault(epoch_of[genre.get(event.item_id, "")], position)
    rank = {epoch: r for r, epoch in enumerate(sorted(first, key=first.get))}
    replayed = sorted(ordered, key=lambda e: rank[epoch_of[genre.get(e.item_id, "")]])
    return [event._replace(ts=float(i)) for i, event in enumerate(replayed)]


def apply_scenario(name: str, events: Sequence[Event], items: Sequence[Item]) -> list[Event]:
    if name == "time":
        return list(events)
    if name == "genre-epochs":
        return genre_epochs(events, items)
    raise ValueError(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")
