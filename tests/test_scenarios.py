"""The drift scenario: MovieLens-shaped items replayed one genre group after another."""

from __future__ import annotations

import pytest

from learners.evaluation.scenarios import apply_scenario, genre_epochs, genre_of
from learners.records import Event, Item


def test_genre_is_the_first_listed_one():
    assert genre_of("Heat (1995) | Action, Crime, Thriller") == "Action"
    assert genre_of("Heat (1995) | Action|Crime") == "Action"
    assert genre_of("no genres here") == ""


def test_genre_epochs_play_each_group_in_time_order_after_the_other():
    genres = ["Action", "Comedy", "Drama", "Horror", "Western"]
    items = [Item(f"i{g}", f"Film {g} (1999) | {genre}, Other") for g, genre in enumerate(genres)]
    # Events alternate over the genres in time; two events per genre.
    events = [Event(f"e{t}", f"u{t % 3}", f"i{t % 5}", "click", 100.0 + t) for t in range(10)]
    out = genre_epochs(events, items, epochs=5)
    assert sorted(e.event_id for e in out) == sorted(e.event_id for e in events)  # a reordering
    assert [e.ts for e in out] == [float(i) for i in range(10)]  # P1's sort keeps the new order
    order = [e.item_id for e in out]
    assert order == ["i0", "i0", "i1", "i1", "i2", "i2", "i3", "i3", "i4", "i4"]
    ids = [e.event_id for e in out]
    assert ids.index("e0") < ids.index("e5")  # within an epoch: time order
    assert apply_scenario("time", events, items) == events
    with pytest.raises(ValueError):
        apply_scenario("shuffle", events, items)
