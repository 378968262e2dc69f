"""``--distributed`` start-up: the checkpoint version the ranks agree on, and reading again what it gave up."""

from __future__ import annotations

import pytest

from stream.worker.group_restore import GroupRewind, RanksDisagree, common_version, group_offsets


def test_all_ranks_equal_resume_from_their_newest():
    assert common_version([[3, 4, 5], [3, 4, 5], [3, 4, 5]]) == 5


def test_a_rank_behind_by_one_takes_the_group_back_to_its_newest():
    # Rank 1 was killed while writing version 5: it keeps 4, the others go back to 4 too.
    assert common_version([[3, 4, 5], [2, 3, 4], [3, 4, 5]]) == 4


def test_an_empty_rank_among_ranks_with_checkpoints_is_refused():
    with pytest.raises(RanksDisagree, match="no checkpoint of one model version in common") as info:
        common_version([[4, 5], []], "/state/rank-*")
    message = str(info.value)
    assert "/state/rank-*" in message and "rank 1: none" in message and "remove every rank's folder" in message


def test_no_version_in_common_is_refused_saying_which_each_rank_has():
    with pytest.raises(RanksDisagree, match=r"rank 0: \[1, 2\]; rank 1: \[7, 8, 9\]"):
        common_version([[1, 2], [7, 8, 9]])


def test_no_checkpoints_anywhere_starts_fresh():
    assert common_version([[], [], []]) is None


def test_group_offsets_are_the_furthest_a_rank_holds():
    offsets = group_offsets([{("e", 0): 10, ("e", 1): 4}, {("e", 1): 7, ("e", 2): 3}])
    assert offsets == {("e", 0): 10, ("e", 1): 7, ("e", 2): 3}


class _Events:
    """The few ``KafkaSource`` calls ``GroupRewind`` makes."""

    def __init__(self, committed: dict) -> None:
        self.commits = dict(committed)
        self.assigned: list = []
        self.seeks: list = []
        self.held: set = set()

    def partitions(self, topic):
        return sorted({p for t, p in self.commits if t == topic})

    def committed(self, topic, partition):
        return self.commits.get((topic, partition))

    def assignment(self):
        return list(self.assigned)

    def seek(self, topic, partition, offset):
        self.seeks.append(((topic, partition), offset))

    def hold(self, partitions):
        self.held.update(partitions)

    def release(self, partitions):
        self.held.difference_update(partitions)


def test_partitions_committed_past_the_checkpoints_are_read_again_once_unless_moved_on_since():
    events = _Events({("e", 0): 50, ("e", 1): 20, ("e", 2): 30, ("e", 3): 9, ("e", 5): None})
    rewind = GroupRewind({("e", 0): 40, ("e", 1): 20, ("e", 2): 25})
    rewind.snapshot(events, "e")
    assert set(rewind.targets) == {("e", 0), ("e", 2)}  # e-1's commit is the checkpoint's: nothing to do
    # Where the model starts: the checkpoints' offsets, the commit where no checkpoint names one (e-3),
    # the beginning where nothing is committed either (e-5).
    assert rewind.start == {("e", 0): 40, ("e", 1): 20, ("e", 2): 25, ("e", 3): 9, ("e", 5): 0}
    assert rewind.covered({("e", 1): 26, ("e", 4): 2}) == {("e", 0): 40, ("e", 1): 26, ("e", 2): 25, ("e", 3): 9,
                                                         ("e", 4): 2, ("e", 5): 0}

    events.assigned = [("e", 0), ("e", 1)]
    rewind.hold(events, events.assigned)
    assert events.held == {("e", 0)}  # nothing fetched of it before the seek
    rewind.settle(events)
    assert events.seeks == [(("e", 0), 40)] and not events.held and not rewind.held

    # e-2 moved on (another rank read it from 25 and committed) before it came here: no seek.
    events.commits[("e", 2)] = 33
    events.assigned = [("e", 2)]
    rewind.hold(events, events.assigned)
    rewind.settle(events)
    assert events.seeks == [(("e", 0), 40)] and not rewind.targets

    # Once settled, a later assignment of e-0 reads on from its commit.
    events.assigned = [("e", 0)]
    rewind.hold(events, events.assigned)
    assert not events.held


def test_a_held_partition_revoked_before_the_loop_settles_it_stays_a_target():
    events = _Events({("e", 0): 50})
    rewind = GroupRewind({("e", 0): 40})
    rewind.snapshot(events, "e")
    rewind.hold(events, [("e", 0)])
    events.assigned = []  # revoked in a later poll
    rewind.settle(events)
    assert not events.seeks and ("e", 0) in rewind.targets and not rewind.held


def test_a_partition_committed_only_after_the_restored_checkpoints_is_read_again_from_its_beginning():
    # The checkpoints name it at 0 (nothing committed when that run started); it was committed since.
    events = _Events({("e", 0): 70})
    rewind = GroupRewind({("e", 0): 0})
    rewind.snapshot(events, "e")
    assert rewind.targets == {("e", 0): (0, 70)}


def test_the_offsets_the_ranks_share_in_an_agreed_turn_go_into_each_ranks_checkpoint():
    """Rank 0 of two: what rank 1 read of its partitions is in the group's model, so a group that
    shrinks to rank 0 alone must not read it again."""
    events = _Events({("e", 0): 0, ("e", 1): 0})
    rewind = GroupRewind({})
    rewind.snapshot(events, "e")
    mine = rewind.covered({("e", 0): 30})
    assert mine == {("e", 0): 30, ("e", 1): 0}
    rewind.learn_group([mine, {("e", 0): 0, ("e", 1): 45}])  # rank 1 read e-1 up to 45
    assert rewind.covered({("e", 0): 31}) == {("e", 0): 31, ("e", 1): 45}

    # Rank 0 alone restarts from that checkpoint, after rank 1 committed e-1 at 45: nothing read again.
    events.commits = {("e", 0): 31, ("e", 1): 45}
    alone = GroupRewind(group_offsets([rewind.covered({("e", 0): 31})]))
    alone.snapshot(events, "e")
    assert not alone.targets and alone.start == {("e", 0): 31, ("e", 1): 45}
