"""Protocol P1 (docs/formats.md): prequential (test-then-train) evaluation,
with its cold-item slice P1-cold (step 5) measured on the same run, its test
users split into returning and active ones, and a scenario's group checks
(retention, novel) and block sets (plasticity).

What does not depend on the strategy (block split, catalogue, each block's
test users with their history and truth) is computed once by ``prepare_p1``
and shared; ``run_prepared`` then drives one ``Recommender`` through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NamedTuple, Optional, Protocol, Sequence, runtime_checkable

import numpy as np

from learners.records import Event, Item

# Called after every step with (steps done, steps in all, what was just done).
Progress = Callable[[int, int, str], None]

# Scores are clipped into the finite range so an excluded candidate (-inf)
# always ranks below every real one, whatever the strategy returns.
_HIGHEST = float(np.finfo(np.float64).max)
_CELLS_PER_CHUNK = 1 << 23  # users x items float64 cells scored at once (64 MiB)


@runtime_checkable
class Recommender(Protocol):
    """What a strategy offers to be evaluated.

    ``freeze_users`` returns what these users' vectors are made of as of now
    (their history), copied so that later learning cannot change it. ``scores``
    ranks items for such frozen users with the model as it is when called: P1
    scores each block's test users from their history before the block, both
    at the test and at the forgetting re-tests after more training, so only
    the model differs between R[k][k] and R[end][k].

    ``scores`` must give one number per (user, item) for every id it is asked
    about, including items never passed to ``add_items`` (known only from
    events) and items no event has mentioned yet. Higher ranks first.
    """

    name: str
    samples_trained: int
    train_seconds: float

    def add_items(self, items: list[Item]) -> None: ...

    def learn(self, events: list[Event]) -> None: ...

    def freeze_users(self, user_ids: list[str]) -> Any: ...

    def scores(self, users: Any, item_ids: list[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class BlockTest:
    """One block's test users with the catalogue rows P1 needs for them."""

    block: int
    user_ids: list[str]
    history: list[np.ndarray]  # rows the user had an event with before the block: not candidates
    truth: list[np.ndarray]  # rows new to the user in the block (never empty)
    # Only these rows are candidates (P1-cold: the items with few events before the block);
    # None: the whole catalogue.
    candidates: Optional[np.ndarray] = None
    # Per user: True when their latest event before the block lies before block - 1 (returning);
    # None where the split is not made.
    returning: Optional[np.ndarray] = None


class GroupCheck(NamedTuple):
    """A scenario's extra test at one block: P1's test users there, ranked among these items only."""

    name: str  # the results file's key, e.g. "retention"
    block: int
    item_ids: frozenset[str]


@dataclass(frozen=True)
class PreparedP1:
    """The strategy-independent part of P1, built once per data set."""

    blocks: list[list[Event]]
    items: list[Item]  # catalogue items that have text, in catalogue order
    catalogue: list[str]  # every candidate item id; the index breaks score ties
    tests: list[BlockTest]  # one per block 1..B-1
    k: int
    cold_tests: list[BlockTest] = field(default_factory=list)  # P1-cold, one per block 1..B-1
    group_tests: dict[str, list[BlockTest]] = field(default_factory=dict)  # a scenario's group checks by name
    block_sets: dict[str, tuple[int, ...]] = field(default_factory=dict)  # P1's own tests at these blocks

    @property
    def n_events(self) -> int:
        return sum(len(block) for block in self.blocks)


@dataclass(frozen=True)
class BlockScore:
    block: int
    recall: float
    ndcg: float
    users: int


@dataclass(frozen=True)
class SliceScore:
    """A set of tests aggregated as P1 aggregates its blocks: the mean over blocks with users."""

    recall: float
    ndcg: float
    users: int  # test users over all its blocks


def aggregate(scores: Sequence[BlockScore]) -> SliceScore:
    measured = [s for s in scores if s.users]
    return SliceScore(_mean([s.recall for s in measured]), _mean([s.ndcg for s in measured]),
                      sum(s.users for s in measured))


@dataclass
class StrategyResult:
    name: str
    k: int
    recall: float  # mean over blocks with test users
    ndcg: float
    bwt: Optional[float]  # None when no block pair was measurable (B < 3)
    train_seconds: float
    samples_trained: int
    per_block: list[BlockScore]
    r_diag: dict[int, float]  # R[k][k]: NDCG on block k's test right after training on block k
    r_end: dict[int, float]  # R[end][k]: the same test after the last block
    cold_recall: float = 0.0  # P1-cold (docs/formats.md), same run
    cold_ndcg: float = 0.0
    cold_per_block: list[BlockScore] = field(default_factory=list)
    # "returning" and "active" always; a scenario's group checks and block sets by their names.
    slices: dict[str, SliceScore] = field(default_factory=dict)


COLD_EVENTS = 5  # P1-cold: an item with fewer events than this before a block is cold there


def prepare_p1(events: Sequence[Event], items: Sequence[Item], blocks: int = 10,
               k: int = 10, block_sizes: Optional[Sequence[int]] = None,
               group_checks: Sequence[GroupCheck] = (),
               block_sets: Optional[Mapping[str, Sequence[int]]] = None) -> PreparedP1:
    """``block_sizes`` (a scenario's own cut, in time order) replaces the equal cut into ``blocks``."""
    if block_sizes is not None:
        blocks = len(block_sizes)
        if sum(block_sizes) != len(events) or min(block_sizes) < 0:
            raise ValueError(f"block sizes {list(block_sizes)} do not cut {len(events)} events")
    if blocks < 2:
        raise ValueError(f"P1 needs at least 2 blocks, got {blocks}")
    if k < 1:
        raise ValueError(f"K must be at least 1, got {k}")
    if not events:
        raise ValueError("P1 needs at least one event")
    ordered = sorted(events, key=lambda e: e.ts)  # sorted() is stable: ts ties keep file order
    sizes = (list(block_sizes) if block_sizes is not None
             else [len(part) for part in np.array_split(np.arange(len(ordered)), blocks)])
    bounds = np.cumsum([0] + sizes)
    split = [ordered[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    newest: dict[str, Item] = {}  # a re-published item keeps its place, newest text wins
    for item in items:
        newest[item.item_id] = item
    catalogue = list(newest)
    row = {item_id: i for i, item_id in enumerate(catalogue)}
    for event in ordered:  # items with no text are still candidates
        if event.item_id not in row:
            row[event.item_id] = len(catalogue)
            catalogue.append(event.item_id)

    tests: list[BlockTest] = []
    cold_tests: list[BlockTest] = []
    history: dict[str, set[int]] = {}
    last_block: dict[str, int] = {}  # the block of each user's latest event so far
    counts = np.zeros(len(catalogue), dtype=np.int64)  # events per row before the block
    for number, block in enumerate(split):
        in_block: dict[str, set[int]] = {}
        for event in block:
            in_block.setdefault(event.user_id, set()).add(row[event.item_id])
        if number > 0:
            test = _block_test(number, in_block, history, last_block)
            tests.append(test)
            cold_tests.append(_restricted_test(test, np.flatnonzero(counts < COLD_EVENTS)))
        for user_id, rows in in_block.items():
            history.setdefault(user_id, set()).update(rows)
            last_block[user_id] = number
        np.add.at(counts, [row[event.item_id] for event in block], 1)
    group_tests: dict[str, list[BlockTest]] = {}
    for check in group_checks:
        if not 1 <= check.block < len(split):
            raise ValueError(f"group check {check.name!r} at block {check.block}: P1 tests blocks 1..{len(split) - 1}")
        rows = np.array(sorted(row[i] for i in check.item_ids if i in row), dtype=np.intp)
        group_tests.setdefault(check.name, []).append(_restricted_test(tests[check.block - 1], rows))
    sets = {name: tuple(numbers) for name, numbers in (block_sets or {}).items()}
    return PreparedP1(split, list(newest.values()), catalogue, tests, k, cold_tests, group_tests, sets)


def _block_test(number: int, in_block: dict[str, set[int]], history: dict[str, set[int]],
                last_block: dict[str, int]) -> BlockTest:
    users, seen, truth, returning = [], [], [], []
    for user_id, rows in in_block.items():
        before = history.get(user_id)
        if not before:
            continue  # no history: not a test user
        new = rows - before
        if new:
            users.append(user_id)
            seen.append(np.fromiter(sorted(before), dtype=np.intp, count=len(before)))
            truth.append(np.fromiter(sorted(new), dtype=np.intp, count=len(new)))
            returning.append(last_block[user_id] < number - 1)
    return BlockTest(number, users, seen, truth, returning=np.array(returning, dtype=bool))


def _restricted_test(test: BlockTest, candidates: np.ndarray) -> BlockTest:
    """The P1 test users whose new items include some of ``candidates``, ranked among those
    only (their history still excluded): P1-cold's cold items, a scenario group's items."""
    users, seen, truth = [], [], []
    for user_id, before, new in zip(test.user_ids, test.history, test.truth):
        hit = new[np.isin(new, candidates)]
        if len(hit):
            users.append(user_id)
            seen.append(before)
            truth.append(hit)
    return BlockTest(test.block, users, seen, truth, candidates=candidates)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Row-wise column indices of the k highest scores, best first.

    Equal scores rank by the lower column (catalogue order), also at the
    top-k boundary where ``argpartition`` alone would pick arbitrarily.
    """
    n_rows, n_cols = scores.shape
    k = min(k, n_cols)
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    values = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -values), axis=1)
    top = np.take_along_axis(part, order, axis=1)
    kth = values.min(axis=1)
    tied = np.flatnonzero((scores >= kth[:, None]).sum(axis=1) > k)
    for r in tied:  # more columns share the k-th score than fit: choose among all of them
        cols = np.flatnonzero(scores[r] >= kth[r])
        top[r] = cols[np.argsort(-scores[r, cols], kind="stable")[:k]]
    return top


def user_metrics(ranked: np.ndarray, truth: np.ndarray, k: int) -> tuple[float, float]:
    """Recall@K and NDCG@K (binary gains) of one ranked list against a truth set."""
    hits = np.isin(ranked[:k], truth)
    ideal = min(k, len(truth))
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = float(discounts[: len(hits)][hits].sum())
    return float(hits.sum()) / ideal, dcg / float(discounts[:ideal].sum())


def score_block(recommender: Recommender, test: BlockTest, catalogue: list[str], k: int,
                frozen: Optional[list] = None) -> BlockScore:
    """Mean Recall@K and NDCG@K over a block's test users, with the model as it is now.

    ``frozen``: the users as ``freeze_block`` returned them; frozen now when not given.
    """
    return _block_score(test.block, *score_users(recommender, test, catalogue, k, frozen))


def _block_score(block: int, recalls: np.ndarray, ndcgs: np.ndarray) -> BlockScore:
    if not len(recalls):
        return BlockScore(block, 0.0, 0.0, 0)
    return BlockScore(block, float(np.mean(recalls)), float(np.mean(ndcgs)), len(recalls))


def score_users(recommender: Recommender, test: BlockTest, catalogue: list[str], k: int,
                frozen: Optional[list] = None) -> tuple[np.ndarray, np.ndarray]:
    """Recall@K and NDCG@K of each of a block's test users, in ``test.user_ids`` order.

    ``frozen``: the users as ``freeze_users`` returned them, one entry per chunk
    (from ``freeze_block``); frozen now when not given.
    """
    if not test.user_ids:
        return np.zeros(0), np.zeros(0)
    chunk = _chunk(catalogue)
    frozen = frozen if frozen is not None else freeze_block(recommender, test, catalogue)
    recalls, ndcgs = [], []
    outside = None
    if test.candidates is not None:
        outside = np.ones(len(catalogue), dtype=bool)
        outside[test.candidates] = False
    for part, start in enumerate(range(0, len(test.user_ids), chunk)):
        users = test.user_ids[start:start + chunk]
        scores = np.array(recommender.scores(frozen[part], catalogue), dtype=np.float64)
        if scores.shape != (len(users), len(catalogue)):
            raise ValueError(f"{recommender.name}: scores() returned shape {scores.shape}, "
                             f"expected {(len(users), len(catalogue))}")
        np.nan_to_num(scores, copy=False, nan=-_HIGHEST, posinf=_HIGHEST, neginf=-_HIGHEST)
        if outside is not None:
            scores[:, outside] = -np.inf
        for i, seen in enumerate(test.history[start:start + chunk]):
            scores[i, seen] = -np.inf
        for ranked, truth in zip(top_k(scores, k), test.truth[start:start + chunk]):
            recall, ndcg = user_metrics(ranked, truth, k)
            recalls.append(recall)
            ndcgs.append(ndcg)
    return np.array(recalls), np.array(ndcgs)


def _chunk(catalogue: list[str]) -> int:
    return max(1, _CELLS_PER_CHUNK // max(1, len(catalogue)))


def freeze_block(recommender: Recommender, test: BlockTest, catalogue: list[str]) -> list:
    """The block's test users as the recommender has them now, in scoring chunks."""
    chunk = _chunk(catalogue)
    return [recommender.freeze_users(test.user_ids[start:start + chunk])
            for start in range(0, len(test.user_ids), chunk)]


def run_prepared(recommender: Recommender, prepared: PreparedP1,
                 progress: Optional[Progress] = None) -> StrategyResult:
    """Block 0 trains; each later block is tested then trained; forgetting at the end."""
    k, catalogue, last = prepared.k, prepared.catalogue, len(prepared.blocks) - 1
    total = 2 * len(prepared.blocks) + max(0, last - 1)
    done = 0

    def step(stage: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, stage)

    recommender.add_items(list(prepared.items))
    _learn(recommender, prepared.blocks[0])
    step("train block 0")
    per_block: list[BlockScore] = []
    r_diag: dict[int, float] = {}
    cold_per_block: list[BlockScore] = []
    cold_tests = {test.block: test for test in prepared.cold_tests}
    by_returning: dict[str, list[BlockScore]] = {"returning": [], "active": []}
    group_scores: dict[str, list[BlockScore]] = {name: [] for name in prepared.group_tests}
    group_at = {(name, t.block): t for name, tests in prepared.group_tests.items() for t in tests}
    frozen: dict[int, list] = {}  # each block's test users with their history before the block
    for test in prepared.tests:
        frozen[test.block] = freeze_block(recommender, test, catalogue)
        recalls, ndcgs = score_users(recommender, test, catalogue, k, frozen[test.block])
        per_block.append(_block_score(test.block, recalls, ndcgs))
        if test.returning is not None:
            back = test.returning
            by_returning["returning"].append(_block_score(test.block, recalls[back], ndcgs[back]))
            by_returning["active"].append(_block_score(test.block, recalls[~back], ndcgs[~back]))
        # The same moment and model as the P1 test:
        cold = cold_tests.get(test.block)
        if cold is not None:
            cold_per_block.append(score_block(recommender, cold, catalogue, k))
        for name in group_scores:
            group = group_at.get((name, test.block))
            if group is not None:
                group_scores[name].append(score_block(recommender, group, catalogue, k))
        step(f"test block {test.block}")
        _learn(recommender, prepared.blocks[test.block])
        step(f"train block {test.block}")
        if test.block < last:
            after = score_block(recommender, test, catalogue, k, frozen[test.block])
            if after.users:
                r_diag[test.block] = after.ndcg
            step(f"retest block {test.block}")
    r_end = {b: score_block(recommender, prepared.tests[b - 1], catalogue, k, frozen[b]).ndcg
             for b in r_diag}
    step("forgetting")

    measured = [s for s in per_block if s.users]
    cold_measured = [s for s in cold_per_block if s.users]
    slices = {name: aggregate(scores) for name, scores in {**by_returning, **group_scores}.items()}
    for name, numbers in prepared.block_sets.items():
        slices[name] = aggregate([s for s in per_block if s.block in numbers])
    return StrategyResult(
        name=recommender.name, k=k,
        recall=_mean([s.recall for s in measured]), ndcg=_mean([s.ndcg for s in measured]),
        bwt=float(np.mean([r_end[b] - r_diag[b] for b in r_diag])) if r_diag else None,
        train_seconds=float(recommender.train_seconds),
        samples_trained=int(recommender.samples_trained),
        per_block=per_block, r_diag=r_diag, r_end=r_end,
        cold_recall=_mean([s.recall for s in cold_measured]), cold_ndcg=_mean([s.ndcg for s in cold_measured]),
        cold_per_block=cold_per_block, slices=slices)


def run_p1(recommender: Recommender, events: Sequence[Event], items: Sequence[Item],
           blocks: int = 10, k: int = 10, progress: Optional[Progress] = None) -> StrategyResult:
    """Protocol P1 for one strategy; use ``prepare_p1`` + ``run_prepared`` for several."""
    return run_prepared(recommender, prepare_p1(events, items, blocks, k), progress)


def _learn(recommender: Recommender, events: list[Event]) -> None:
    if events:  # fewer events than blocks leaves some blocks empty: nothing to learn
        recommender.learn(events)


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else 0.0
