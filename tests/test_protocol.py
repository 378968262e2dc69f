"""Protocol P1 on tiny hand-made streams whose right answers are worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from learners.evaluation.popularity import PopularityRecommender
from learners.evaluation.protocol import (Recommender, prepare_p1, run_p1, run_prepared, top_k,
                                          user_metrics)
from learners.records import Event, Item

LOG3 = math.log2(3)  # discount of rank 2 is 1/log2(3)


def ev(ts: float, user: str, item: str, eid: str = "") -> Event:
    return Event(event_id=eid or f"e{ts}-{user}-{item}", user_id=user, item_id=item,
                 event_type="click", ts=float(ts))


def catalogue(*ids: str) -> list[Item]:
    return [Item(item_id=i, text=f"item {i}") for i in ids]


class FakeRecommender:
    """Hand-set scores per user; after ``switch_after`` learn calls it uses ``later``."""

    def __init__(self, table: dict, later: dict | None = None, switch_after: int = 10**9,
                 name: str = "fake") -> None:
        self.name, self.table, self.later, self.switch_after = name, table, later, switch_after
        self.samples_trained, self.train_seconds = 0, 0.0
        self.learned: list[list[Event]] = []
        self.added: list[Item] = []
        self.asked_items: list[str] = []

    def add_items(self, items: list[Item]) -> None:
        self.added = list(items)

    def learn(self, events: list[Event]) -> None:
        self.learned.append(list(events))
        self.samples_trained += len(events)

    def freeze_users(self, user_ids: list[str]) -> list[str]:
        return list(user_ids)

    def scores(self, user_ids: list[str], item_ids: list[str]) -> np.ndarray:
        self.asked_items = list(item_ids)
        table = self.later if len(self.learned) > self.switch_after else self.table
        return np.array([[table.get(u, {}).get(i, 0.0) for i in item_ids] for u in user_ids])


def test_fake_and_popularity_satisfy_the_protocol():
    assert isinstance(FakeRecommender({}), Recommender)
    assert isinstance(PopularityRecommender(), Recommender)


def test_block_sizes_follow_array_split():
    # 23 events in 5 blocks: 23 = 5*4 + 3, so the first 3 blocks get one extra.
    events = [ev(t, f"u{t % 3}", f"i{t}") for t in range(23)]
    prepared = prepare_p1(events, [], blocks=5)
    assert [len(b) for b in prepared.blocks] == [5, 5, 5, 4, 4]
    fake = FakeRecommender({})
    run_prepared(fake, prepared)
    assert [len(b) for b in fake.learned] == [5, 5, 5, 4, 4]
    assert fake.samples_trained == 23


def test_empty_blocks_are_not_learned():
    # 3 events in 5 blocks: sizes 1,1,1,0,0; learn() is never called with nothing.
    prepared = prepare_p1([ev(1, "u", "a"), ev(2, "u", "b"), ev(3, "u", "c")], [], blocks=5)
    assert [len(b) for b in prepared.blocks] == [1, 1, 1, 0, 0]
    fake = FakeRecommender({})
    run_prepared(fake, prepared)
    assert len(fake.learned) == 3


def test_ts_ties_keep_file_order():
    # File order e1(ts 2), e2, e3, e4 (ts 1), e5 (ts 3): stable sort gives
    # e2 e3 e4 | e1 e5 with B=2 (5 events: 3 + 2).
    events = [ev(2, "u", "a", "e1"), ev(1, "u", "b", "e2"), ev(1, "v", "c", "e3"),
              ev(1, "u", "d", "e4"), ev(3, "v", "e", "e5")]
    prepared = prepare_p1(events, [], blocks=2)
    assert [[e.event_id for e in b] for b in prepared.blocks] == [["e2", "e3", "e4"], ["e1", "e5"]]


def test_worked_example():
    # Catalogue a b c d from items.jsonl, then z seen only in events. B=3, K=2.
    # block 0: u1 a, u1 b, u2 a
    # block 1: u1 c, u2 b, u3 a      (u3 has no history: skipped)
    # block 2: u1 z, u2 d, u3 b
    events = [ev(1, "u1", "a"), ev(2, "u1", "b"), ev(3, "u2", "a"),
              ev(4, "u1", "c"), ev(5, "u2", "b"), ev(6, "u3", "a"),
              ev(7, "u1", "z"), ev(8, "u2", "d"), ev(9, "u3", "b")]
    table = {"u1": {"a": 9, "b": 8, "d": 5, "c": 4, "z": 3},
             "u2": {"b": 1, "c": 2, "d": 3, "z": 0}}  # u3: all 0, ties -> catalogue order
    fake = FakeRecommender(table)
    result = run_p1(fake, events, catalogue("a", "b", "c", "d"), blocks=3, k=2)
    # Block 1. u1: history {a,b} (excluded although scored highest), truth {c};
    #   ranking d, c, z -> c at rank 2: recall 1/min(2,1)=1, ndcg (1/log2 3)/1.
    # u2: history {a}, truth {b}; ranking d, c, b, z -> b at rank 3: recall 0, ndcg 0.
    b1_ndcg = (1 / LOG3 + 0) / 2
    # Block 2. u1: history {a,b,c}, truth {z} (never in items.jsonl); ranking d, z:
    #   recall 1, ndcg 1/log2 3. u2: history {a,b}, truth {d}; d first: 1, 1.
    #   u3: history {a}, truth {b}; all scores 0, catalogue order b, c, d, z: 1, 1.
    b2_ndcg = (1 / LOG3 + 1 + 1) / 3
    blocks = [(s.block, s.users, s.recall) for s in result.per_block]
    assert blocks == [(1, 2, pytest.approx(0.5)), (2, 3, pytest.approx(1.0))]
    assert result.per_block[0].ndcg == pytest.approx(b1_ndcg)
    assert result.per_block[1].ndcg == pytest.approx(b2_ndcg)
    assert result.recall == pytest.approx(0.75)
    assert result.ndcg == pytest.approx((b1_ndcg + b2_ndcg) / 2)
    # Static scores: R[1][1] = R[end][1], so no forgetting.
    assert result.r_diag == {1: pytest.approx(b1_ndcg)}
    assert result.r_end == {1: pytest.approx(b1_ndcg)}
    assert result.bwt == pytest.approx(0.0)
    # add_items got the texts; every catalogue item, z included, is scored.
    assert [i.item_id for i in fake.added] == ["a", "b", "c", "d"]
    assert fake.asked_items == ["a", "b", "c", "d", "z"]
    assert result.samples_trained == 9


def test_user_without_history_is_not_tested():
    # v appears first in block 1: not a test user even with a new item there.
    events = [ev(1, "u", "a"), ev(2, "u", "b"), ev(3, "v", "c"), ev(4, "u", "c")]
    prepared = prepare_p1(events, catalogue("a", "b", "c"), blocks=2)
    assert prepared.tests[0].user_ids == ["u"]
    result = run_prepared(FakeRecommender({"u": {"c": 1}}), prepared)
    assert (result.per_block[0].users, result.recall) == (1, 1.0)


def test_user_without_new_items_is_skipped():
    # u only re-visits a in block 1: empty truth, so block 1 has no users at all
    # and averages are over measured blocks only (none here -> 0).
    result = run_p1(FakeRecommender({}), [ev(1, "u", "a"), ev(2, "u", "a")], [], blocks=2)
    assert result.per_block[0].users == 0
    assert (result.recall, result.ndcg) == (0.0, 0.0)


def test_item_missing_from_items_file_is_candidate():
    # x has no text anywhere; u's truth is {x}; the fake ranks x first -> hit.
    events = [ev(1, "u", "a"), ev(2, "u", "x")]
    result = run_p1(FakeRecommender({"u": {"x": 5, "b": 1}}), events, catalogue("a", "b"),
                    blocks=2, k=1)
    assert result.recall == 1.0 and result.ndcg == 1.0


def test_seen_items_are_not_candidates():
    # u saw a in block 0; the fake scores a highest, but a is excluded, so at
    # K=1 the top item is b, the truth: recall 1. Were a a candidate: recall 0.
    events = [ev(1, "u", "a"), ev(2, "u", "a"), ev(3, "u", "b")]
    result = run_p1(FakeRecommender({"u": {"a": 10, "b": 1}}), events, catalogue("a", "b", "c"),
                    blocks=2, k=1)
    assert result.per_block[0].users == 1
    assert result.recall == 1.0


def test_ndcg_with_truth_smaller_than_k():
    # K=3, truth {7}: hit at rank 2 -> recall 1/min(3,1) = 1, ndcg (1/log2 3) / 1.
    assert user_metrics(np.array([5, 7, 9]), np.array([7]), 3) == (
        pytest.approx(1.0), pytest.approx(1 / LOG3))
    # K=3, truth {5,9}: ranks 1 and 3 -> dcg 1 + 1/2, idcg 1 + 1/log2 3; recall 2/2.
    recall, ndcg = user_metrics(np.array([5, 7, 9]), np.array([5, 9]), 3)
    assert recall == pytest.approx(1.0)
    assert ndcg == pytest.approx(1.5 / (1 + 1 / LOG3))


def test_recall_denominator_is_capped_at_k():
    # K=2, truth {1,2,3}: one hit at rank 1 -> recall 1/min(2,3) = 0.5,
    # ndcg 1 / (1 + 1/log2 3).
    recall, ndcg = user_metrics(np.array([1, 9]), np.array([1, 2, 3]), 2)
    assert recall == pytest.approx(0.5)
    assert ndcg == pytest.approx(1 / (1 + 1 / LOG3))


def test_top_k_breaks_ties_by_catalogue_order():
    scores = np.array([[1.0, 3.0, 3.0, 3.0, 0.0],
                       [2.0, 2.0, 2.0, 2.0, 2.0],
                       [-np.inf, 1.0, 5.0, 1.0, 1.0]])
    assert top_k(scores, 2).tolist() == [[1, 2], [0, 1], [2, 1]]
    assert top_k(scores, 9).shape == (3, 5)  # K larger than the catalogue


def test_non_finite_scores_never_beat_exclusion():
    # The fake returns NaN for everything: NaN ranks like the lowest finite
    # score, still above seen items; ties -> catalogue order b, c.
    events = [ev(1, "u", "a"), ev(2, "u", "c")]
    fake = FakeRecommender({"u": {"a": math.nan, "b": math.nan, "c": math.nan}})
    result = run_p1(fake, events, catalogue("a", "b", "c"), blocks=2, k=2)
    # truth {c} at rank 2 (a is excluded): recall 1, ndcg 1/log2 3.
    assert result.recall == 1.0
    assert result.ndcg == pytest.approx(1 / LOG3)


def _drift_stream():
    # B=4, two events per block; e and f are never truth. Truths: block 1 u1 b,
    # u2 c; block 2 u1 c, u2 b; block 3 both d.
    events = [ev(1, "u1", "a"), ev(2, "u2", "a"), ev(3, "u1", "b"), ev(4, "u2", "c"),
              ev(5, "u1", "c"), ev(6, "u2", "b"), ev(7, "u1", "d"), ev(8, "u2", "d")]
    good = {"u1": {"b": 3, "c": 2, "d": 1}, "u2": {"c": 3, "b": 2, "d": 1}}
    bad = {"u1": {"e": 5, "f": 4}, "u2": {"e": 5, "f": 4}}
    return events, catalogue("a", "b", "c", "d", "e", "f"), good, bad


def test_bwt_negative_when_quality_drops_after_more_training():
    # Good scores while <= 3 blocks are learned, bad after the 4th (last).
    # Tests of blocks 1..3 run after 1..3 learn calls: ndcg 1 each.
    # R[1][1], R[2][2] after 2 and 3 calls: 1. R[end][1], R[end][2]: 0.
    # BWT = mean(0 - 1, 0 - 1) = -1.
    events, items, good, bad = _drift_stream()
    result = run_p1(FakeRecommender(good, bad, switch_after=3), events, items, blocks=4, k=1)
    assert [s.ndcg for s in result.per_block] == [1.0, 1.0, 1.0]
    assert result.r_diag == {1: 1.0, 2: 1.0} and result.r_end == {1: 0.0, 2: 0.0}
    assert result.bwt == pytest.approx(-1.0)


def test_bwt_positive_when_quality_rises_at_the_end():
    events, items, good, bad = _drift_stream()
    result = run_p1(FakeRecommender(bad, good, switch_after=3), events, items, blocks=4, k=1)
    assert result.ndcg == 0.0
    assert result.bwt == pytest.approx(1.0)


class OwnHistory:
    """Scores 1 for the items in the user's history: a model that only remembers."""

    name, samples_trained, train_seconds = "own-history", 0, 0.0

    def __init__(self) -> None:
        self.history: dict[str, set[str]] = {}

    def add_items(self, items: list[Item]) -> None:
        pass

    def learn(self, events: list[Event]) -> None:
        for e in events:
            self.history.setdefault(e.user_id, set()).add(e.item_id)

    def freeze_users(self, user_ids: list[str]) -> list[set[str]]:
        return [set(self.history.get(u, ())) for u in user_ids]

    def scores(self, users: list[set[str]], item_ids: list[str]) -> np.ndarray:
        return np.array([[float(i in seen) for i in item_ids] for seen in users])


def test_retests_use_the_history_before_the_block():
    # u1: a in block 0, d in block 1, c in block 2 (B=3, K=1). Block 1's test: history {a},
    # truth {d}. Right after training block 1 the user's live history holds d itself, which
    # would score a hit; P1 re-tests with the history before the block ({a}), so the
    # untouched candidates tie at 0 and b (catalogue order) ranks first: a miss.
    events = [ev(1, "u1", "a"), ev(2, "u1", "d"), ev(3, "u1", "c")]
    result = run_p1(OwnHistory(), events, catalogue("a", "b", "c", "d"), blocks=3, k=1)
    assert result.r_diag == {1: 0.0} and result.r_end == {1: 0.0}
    assert [s.ndcg for s in result.per_block] == [0.0, 0.0]


def test_bwt_undefined_with_two_blocks():
    result = run_p1(FakeRecommender({}), [ev(1, "u", "a"), ev(2, "u", "b")], [], blocks=2)
    assert result.bwt is None


def test_popularity_by_hand():
    # block 0: counts a=2, b=1. Block 1 (B=2, K=1):
    # u1 history {a}, truth {b}: top candidate b (count 1) -> hit.
    # u2 history {a,b}, truth {c}: c and d both 0 -> catalogue order c -> hit.
    events = [ev(1, "u1", "a"), ev(2, "u2", "a"), ev(3, "u2", "b"),
              ev(4, "u1", "b"), ev(5, "u2", "c"), ev(6, "u1", "a")]
    result = run_p1(PopularityRecommender(), events, catalogue("a", "b", "c", "d"), blocks=2, k=1)
    assert (result.per_block[0].users, result.recall, result.ndcg) == (2, 1.0, 1.0)
    assert result.samples_trained == 6


def test_republished_item_keeps_place_and_newest_text():
    items = [Item("a", "old"), Item("b", "b"), Item("a", "new")]
    prepared = prepare_p1([ev(1, "u", "c")], items, blocks=2)
    assert prepared.catalogue == ["a", "b", "c"]
    assert [(i.item_id, i.text) for i in prepared.items] == [("a", "new"), ("b", "b")]


@pytest.mark.parametrize("blocks,k", [(1, 10), (10, 0)])
def test_bad_settings_are_rejected(blocks, k):
    with pytest.raises(ValueError):
        prepare_p1([ev(1, "u", "a")], [], blocks=blocks, k=k)


def test_p1_cold_ranks_only_items_with_few_events_before_the_block():
    # Block 0: "hot" has 5 events (not cold at block 1), "warm" 1, "a" 2; "new" none. Block 1:
    # u0 gets hot and new, u1 gets warm. P1-cold at block 1: every item but hot; u0's cold
    # truth {new}, u1's {warm}.
    block0 = [ev(t, f"x{t}", "hot") for t in range(5)] + [ev(5, "u0", "warm"), ev(6, "u1", "hot"),
                                                          ev(7, "u0", "a"), ev(8, "x9", "a")]
    block1 = [ev(10, "u0", "hot"), ev(11, "u0", "new"), ev(12, "u1", "warm"), ev(13, "u1", "hot"),
              ev(14, "z", "b"), ev(15, "z", "c"), ev(16, "z", "d"), ev(17, "z", "e"), ev(18, "z", "f")]
    prepared = prepare_p1(block0 + block1, catalogue("hot", "warm", "new", "a"), blocks=2, k=1)
    (cold,) = prepared.cold_tests
    ids = prepared.catalogue
    assert sorted(ids[r] for r in cold.candidates) == ["a", "b", "c", "d", "e", "f", "new", "warm"]
    assert cold.user_ids == ["u0", "u1"]
    assert [[ids[r] for r in t] for t in cold.truth] == [["new"], ["warm"]]
    # "hot" scores highest for everyone; P1-cold never offers it: u0 (history warm, a) gets
    # "new" first (a hit), u1 (history hot) gets "a" (a miss).
    table = {u: {"hot": 9.0, "new": 1.0, "warm": 2.0, "a": 3.0} for u in ("u0", "u1")}
    result = run_prepared(FakeRecommender(table), prepared)
    assert result.cold_ndcg == pytest.approx(0.5)
    assert result.cold_per_block[0].users == 2


def test_returning_users_are_those_absent_from_the_block_before():
    # B=4, three events a block. u1 is in every block (active); u2 skips block 1 and is back in
    # block 2, u3 skips block 2 and is back in block 3 (returning there); x starts in block 1.
    events = [ev(1, "u1", "a"), ev(2, "u2", "b"), ev(3, "u3", "c"),
              ev(4, "u1", "d"), ev(5, "u3", "e"), ev(6, "x", "f"),
              ev(7, "u1", "g"), ev(8, "u2", "h"), ev(9, "x", "k"),
              ev(10, "u1", "i"), ev(11, "u3", "j"), ev(12, "x", "b")]
    prepared = prepare_p1(events, catalogue(*"abcdefghij"), blocks=4, k=1)
    assert [(t.user_ids, t.returning.tolist()) for t in prepared.tests] == [
        (["u1", "u3"], [False, False]), (["u1", "u2", "x"], [False, True, False]),
        (["u1", "u3", "x"], [False, True, False])]
    # The returning users' truths score highest, every other candidate ties at 0 (catalogue
    # order: a or b first, never an active user's truth): returning users hit, active ones miss.
    result = run_prepared(FakeRecommender({"u2": {"h": 1.0}, "u3": {"j": 1.0}}), prepared)
    returning, active = result.slices["returning"], result.slices["active"]
    assert (returning.ndcg, returning.recall, returning.users) == (1.0, 1.0, 2)
    assert (active.ndcg, active.recall, active.users) == (0.0, 0.0, 6)
    # P1 itself is unchanged: block means 0, 1/3, 1/3.
    assert result.ndcg == pytest.approx(2 / 9)


def _recurring_prepared():
    from learners.evaluation.scenarios import recurring

    groups = {"a": "Action", "c": "Comedy", "d": "Drama"}
    items = [Item(f"{g}{i}", f"Film {g}{i} (1999) | {genre}") for g, genre in groups.items() for i in range(6)]
    # One user cycling Action, Comedy, Drama: each phase of the replay is 2 events, 1 a block, and
    # every event names an item new to the user (each genre's items in index order).
    events = [ev(t, "u", f"{'acd'[t % 3]}{t // 3}") for t in range(18)]
    plan = recurring(events, items)
    return prepare_p1(plan.events, items, k=1, block_sizes=plan.block_sizes, group_checks=plan.group_checks,
                      block_sets=plan.block_sets)


def test_retention_ranks_only_the_returning_groups_items():
    prepared = _recurring_prepared()
    ids = prepared.catalogue
    first = prepared.group_tests["retention"][0]  # block 6, A2: Action comes back
    assert (first.block, sorted(ids[r] for r in first.candidates)) == (6, [f"a{i}" for i in range(6)])
    # Drama scores above everything, lower indices first within a genre. Among a group's items the
    # first not yet seen is the truth (a hit at K=1); over the whole catalogue a Drama item wins.
    table = {"u": {i: (10.0 if i[0] == "d" else 0.0) - 0.01 * int(i[1:]) for i in ids}}
    result = run_prepared(FakeRecommender(table), prepared)
    by_block = {s.block: s.ndcg for s in result.per_block}
    assert by_block[6] == 0.0  # P1 at A2's first block: Drama ranks first, a miss
    assert result.slices["retention"].ndcg == 1.0 and result.slices["retention"].users == 6
    assert result.slices["novel"].ndcg == 1.0 and result.slices["novel"].users == 2  # blocks 2, 4
    # Plasticity is P1 at every phase's second block: hits only where the truth is Drama (5, 11, 17).
    assert [b for b in prepared.block_sets["plasticity"] if by_block[b] == 1.0] == [5, 11, 17]
    assert result.slices["plasticity"].ndcg == pytest.approx(1 / 3)
    assert result.slices["plasticity"].users == 9


def test_block_sizes_must_cut_every_event():
    with pytest.raises(ValueError, match="do not cut"):
        prepare_p1([ev(1, "u", "a"), ev(2, "u", "b")], [], block_sizes=[1, 2])
