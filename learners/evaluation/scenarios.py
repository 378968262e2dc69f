"""Evaluation scenarios: the same events in another order, so P1 measures something else.

``time`` is the stream as it happened (P1 as docs/formats.md defines it).

``genre-epochs`` is a drift scenario: items are grouped by their first genre
(the ``genres`` attribute, or a text ``Title (year) | Genre, Genre``; MovieLens
lists genres in alphabetical order, so the first is a stable label), genres are dealt into
``epochs`` groups of about equal event counts, and the stream plays one group
after the other, each in its own time order. What was learned on an early
epoch is not seen again later, so a learner that forgets shows it in BWT.

``recurring`` deals the genres into 3 groups the same way, cuts each group's
events into 3 rounds and plays A1 B1 C1 A2 B2 C2 A3 B3 C3, each phase its own
blocks: a taste comes back after two others, so P1 can ask whether the model
still knows it (retention) beside how fast it learns the new one (plasticity).

Timestamps are replaced by the new position, so P1's sort keeps this order.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from learners.evaluation.protocol import GroupCheck
from learners.records import Event, Item

SCENARIOS = ("time", "genre-epochs", "recurring")
GENRE_EPOCHS = 5
RECURRING_GROUPS = 3
RECURRING_ROUNDS = 3
RECURRING_BLOCKS = 18  # two blocks a phase: the first tests what came back, the second what was learned
DEFAULT_BLOCKS = 10


@dataclass(frozen=True)
class ScenarioPlan:
    """What a scenario hands P1: the events in its order, and where its blocks and extra tests lie."""

    events: list[Event]
    block_sizes: Optional[list[int]] = None  # None: P1's equal cut into --blocks
    group_checks: tuple[GroupCheck, ...] = ()
    block_sets: dict[str, tuple[int, ...]] = field(default_factory=dict)  # named sets of P1 blocks


def default_blocks(scenario: str) -> int:
    return RECURRING_BLOCKS if scenario == "recurring" else DEFAULT_BLOCKS


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


def _deal_genres(events: Sequence[Event], genre: dict[str, str], groups: int) -> dict[str, int]:
    """Genre -> group: largest genres first, each to the group with the fewest events so far, so
    the groups are balanced and the same for the same data (ties broken by name)."""
    sizes = Counter(genre.get(e.item_id, "") for e in events)
    load = [0] * groups
    group_of: dict[str, int] = {}
    for name, size in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])):
        target = min(range(groups), key=lambda g: (load[g], g))
        group_of[name] = target
        load[target] += size
    return group_of


def _groups_by_first_event(ordered: list[Event], group_of_event) -> dict[int, int]:
    """Group -> its place in play: groups in order of their earliest event, so the first starts
    where the stream does."""
    first: dict[int, int] = {}
    for position, event in enumerate(ordered):
        first.setdefault(group_of_event(event), position)
    return {group: r for r, group in enumerate(sorted(first, key=first.get))}


def _retimed(events: list[Event]) -> list[Event]:
    return [event._replace(ts=float(i)) for i, event in enumerate(events)]


def genre_epochs(events: Sequence[Event], items: Sequence[Item], epochs: int = GENRE_EPOCHS) -> list[Event]:
    genre = {item.item_id: genre_of_item(item) for item in items}
    epoch_of = _deal_genres(events, genre, epochs)
    ordered = sorted(events, key=lambda e: e.ts)  # stable: ts ties keep file order
    rank = _groups_by_first_event(ordered, lambda e: epoch_of[genre.get(e.item_id, "")])
    replayed = sorted(ordered, key=lambda e: rank[epoch_of[genre.get(e.item_id, "")]])
    return _retimed(replayed)


def recurring(events: Sequence[Event], items: Sequence[Item], blocks: int = RECURRING_BLOCKS,
              groups: int = RECURRING_GROUPS, rounds: int = RECURRING_ROUNDS) -> ScenarioPlan:
    """The recurring-tastes replay with its checks (docs/formats.md).

    The ``blocks`` are dealt over the phases as ``numpy.array_split`` deals them (two a phase at
    18), and each phase's events over its blocks the same way. At a phase's first block a group
    that has played before is a ``retention`` check and one that has not a ``novel`` check
    (block 0 only trains), both ranked among the group's items; every later block of a phase is
    in ``plasticity``, P1's own test there.
    """
    phases = groups * rounds
    if blocks < phases:
        raise ValueError(f"the recurring scenario plays {phases} phases and needs at least one block "
                         f"each: --blocks {blocks} is too few (the default is {RECURRING_BLOCKS})")
    genre = {item.item_id: genre_of_item(item) for item in items}
    group_of = _deal_genres(events, genre, groups)
    ordered = sorted(events, key=lambda e: e.ts)  # stable: ts ties keep file order

    def group_of_event(event: Event) -> int:
        return group_of[genre.get(event.item_id, "")]

    place = _groups_by_first_event(ordered, group_of_event)
    by_group: list[list[Event]] = [[] for _ in range(groups)]
    for event in ordered:
        by_group[place[group_of_event(event)]].append(event)
    # The group's items: every item whose genre the group holds, also those without events.
    members: list[set[str]] = [set() for _ in range(groups)]
    for item_id, name in genre.items():
        if name in group_of:
            members[place[group_of[name]]].add(item_id)
    for event in ordered:  # items named only by events have genre ''
        members[place[group_of_event(event)]].add(event.item_id)
    cut = [np.array_split(np.arange(len(group_events)), rounds) for group_events in by_group]

    played: list[Event] = []
    sizes: list[int] = []
    checks: list[GroupCheck] = []
    plasticity: list[int] = []
    blocks_of_phase = [len(part) for part in np.array_split(np.arange(blocks), phases)]
    for phase in range(phases):
        round_, group = divmod(phase, groups)
        positions = cut[group][round_]
        phase_events = [by_group[group][i] for i in positions]
        first = len(sizes)
        sizes.extend(len(part) for part in np.array_split(np.arange(len(phase_events)), blocks_of_phase[phase]))
        played.extend(phase_events)
        if first > 0:
            checks.append(GroupCheck("retention" if round_ > 0 else "novel", first, frozenset(members[group])))
        plasticity.extend(range(first + 1, len(sizes)))
    return ScenarioPlan(_retimed(played), sizes, tuple(checks), {"plasticity": tuple(plasticity)})


def plan_scenario(name: str, events: Sequence[Event], items: Sequence[Item],
                  blocks: Optional[int] = None) -> ScenarioPlan:
    blocks = default_blocks(name) if blocks is None else blocks
    if name == "time":
        return ScenarioPlan(list(events))
    if name == "genre-epochs":
        return ScenarioPlan(genre_epochs(events, items))
    if name == "recurring":
        return recurring(events, items, blocks)
    raise ValueError(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")


def apply_scenario(name: str, events: Sequence[Event], items: Sequence[Item]) -> list[Event]:
    """The scenario's event order alone (its blocks and checks: ``plan_scenario``)."""
    return plan_scenario(name, events, items).events
