"""The scenarios: MovieLens-shaped items replayed one genre group after another (genre-epochs), or
three groups in three rounds (recurring)."""

from __future__ import annotations

import pytest

from learners.evaluation.scenarios import apply_scenario, genre_epochs, genre_of, plan_scenario, recurring
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


def _three_genres():
    """Action a0..a5, Comedy c0..c5, Drama d0..d5; events cycle Action, Comedy, Drama in time, so
    each genre's events name its items in index order (six each)."""
    genres = {"a": "Action", "c": "Comedy", "d": "Drama"}
    items = [Item(f"{g}{i}", f"Film {g}{i} (1999) | {genre}") for g, genre in genres.items() for i in range(6)]
    events = [Event(f"e{t}", "u", f"{'acd'[t % 3]}{t // 3}", "click", 100.0 + t) for t in range(18)]
    return events, items


def test_recurring_plays_each_group_in_three_rounds_of_two_blocks():
    events, items = _three_genres()
    plan = recurring(events, items)
    # A1 B1 C1 A2 B2 C2 A3 B3 C3, each round two events of its group in time order.
    assert [e.item_id for e in plan.events] == ["a0", "a1", "c0", "c1", "d0", "d1", "a2", "a3", "c2", "c3",
                                                "d2", "d3", "a4", "a5", "c4", "c5", "d4", "d5"]
    assert [e.ts for e in plan.events] == [float(i) for i in range(18)]
    assert plan.block_sizes == [1] * 18  # two blocks a phase
    # First blocks of phases: B1 and C1 novel (A1's is block 0, which only trains); the rest retention.
    assert [(c.name, c.block) for c in plan.group_checks] == [
        ("novel", 2), ("novel", 4), ("retention", 6), ("retention", 8), ("retention", 10),
        ("retention", 12), ("retention", 14), ("retention", 16)]
    action = {f"a{i}" for i in range(6)}
    assert plan.group_checks[2].item_ids == action  # A2 is checked among Action's items only
    assert plan.block_sets == {"plasticity": (1, 3, 5, 7, 9, 11, 13, 15, 17)}


def test_recurring_groups_balance_event_counts_and_follow_blocks():
    events, items = _three_genres()
    # A fourth genre with few events joins the lightest group, so groups stay about equal.
    items.append(Item("w0", "Film w0 (1999) | Western"))
    events.append(Event("e99", "u", "w0", "click", 50.0))  # the earliest event: its group plays first
    plan = recurring(events, items)
    assert plan.events[0].item_id == "w0" and {c.item_ids for c in plan.group_checks} == {
        frozenset({"a0", "a1", "a2", "a3", "a4", "a5", "w0"}),
        frozenset({"c0", "c1", "c2", "c3", "c4", "c5"}), frozenset({"d0", "d1", "d2", "d3", "d4", "d5"})}
    assert sum(plan.block_sizes) == 19 and len(plan.block_sizes) == 18
    # --blocks 9: one block a phase, so nothing is left for plasticity; fewer than 9 is refused.
    nine = plan_scenario("recurring", events, items, blocks=9)
    assert len(nine.block_sizes) == 9 and nine.block_sets == {"plasticity": ()}
    assert [c.block for c in nine.group_checks] == list(range(1, 9))
    with pytest.raises(ValueError, match="at least one block"):
        recurring(events, items, blocks=8)
    assert apply_scenario("recurring", events, items) == plan.events
