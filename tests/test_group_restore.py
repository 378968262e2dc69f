"""``--distributed`` start-up: the checkpoints the ranks agree on, and reading again what it gave up."""

from __future__ import annotations

import json

import pytest

from learners.checkpoint.manifest import FORMAT, MANIFEST, REQUIRED, manifest_bytes
from stream.worker.group_restore import (GroupRewind, RanksDisagree, agreeing_ranks, checkpoint_mark, checkpoints_at,
                                         common_mark, group_offsets, held_marks)


def test_all_ranks_equal_resume_from_their_newest():
    assert common_mark([[(3, 7), (4, 8), (5, 9)]] * 3) == (5, 9)


def test_a_rank_behind_by_one_takes_the_group_back_to_its_newest():
    # Rank 1 was killed while writing version 5: it keeps 4, the others go back to 4 too.
    assert common_mark([[(3, 1), (4, 2), (5, 3)], [(2, 0), (3, 1), (4, 2)], [(3, 1), (4, 2), (5, 3)]]) == (4, 2)


def test_one_version_over_several_turns_takes_the_turn_every_rank_has():
    # No training between turns 4 and 6: one version, but rank 1 was killed writing turn 6's checkpoint.
    # Rank 0's turn-6 checkpoint claims rank 1's partitions as far as rank 1 read by turn 6: restoring
    # it beside rank 1's turn 5 would leave what rank 1 read in between to no one.
    assert common_mark([[(7, 4), (7, 5), (7, 6)], [(6, 3), (7, 4), (7, 5)]]) == (7, 5)


def test_an_empty_rank_among_ranks_with_checkpoints_is_refused():
    with pytest.raises(RanksDisagree, match="no checkpoint of one model version and group turn in common") as info:
        common_mark([[(4, 1), (5, 2)], []], "/state/rank-*")
    message = str(info.value)
    assert "/state/rank-*" in message and "rank 1: none" in message and "remove every rank's folder" in message


def test_the_group_resumes_from_the_ranks_that_share_the_newest_marks():
    # Every rank shares a mark: all agree, on the newest one they all hold (a killed rank kept turn 5).
    assert agreeing_ranks([[(3, 4), (4, 5), (4, 6)], [(3, 3), (3, 4), (4, 5)]]) == ([0, 1], (4, 5))
    # Rank 1's folder is from an earlier time of the group (scaled away and back): left out.
    assert agreeing_ranks([[(8, 20), (9, 21), (9, 22)], [(2, 3), (2, 4)], [(8, 20), (9, 21)]]) == ([0, 2], (9, 21))
    # The newest mark decides, whichever rank holds it; ranks without checkpoints are left out.
    assert agreeing_ranks([[(2, 3)], [], [(9, 21), (9, 22)]]) == ([2], (9, 22))
    assert agreeing_ranks([[], []]) == ([], None)


def test_no_mark_in_common_is_refused_saying_which_each_rank_has():
    with pytest.raises(RanksDisagree, match=r"rank 0: v1 turn 0, v2 turn 1; rank 1: v2 turn 2"):
        common_mark([[(1, 0), (2, 1)], [(2, 2)]])


def test_no_checkpoints_anywhere_starts_fresh():
    assert common_mark([[], [], []]) is None


def _checkpoint(state_dir, name: str, extra: dict):
    """A folder ``quick_check`` takes as complete, with this bookkeeping."""
    folder = state_dir / name
    files = {}
    for required in REQUIRED:
        data = json.dumps(extra).encode() if required == "extra.json" else b"x"
        (folder / required).parent.mkdir(parents=True, exist_ok=True)
        (folder / required).write_bytes(data)
        files[required] = {"size": len(data), "sha256": "not checked here"}
    (folder / MANIFEST).write_bytes(manifest_bytes({"format": FORMAT}, files))
    return folder


def test_the_marks_of_a_folder_come_from_each_checkpoints_bookkeeping(tmp_path):
    older = _checkpoint(tmp_path, "ckpt-000000000007-4", {"group_turn": 5})
    newer = _checkpoint(tmp_path, "ckpt-000000000007-5", {"group_turn": 6})
    legacy = _checkpoint(tmp_path, "ckpt-000000000006-2", {})  # written before turns were numbered
    (tmp_path / "ckpt-000000000008-6").mkdir()  # torn: no manifest
    assert held_marks(tmp_path) == [(6, 0), (7, 5), (7, 6)]
    assert checkpoint_mark(legacy) == (6, 0) and checkpoint_mark(newer) == (7, 6)
    assert checkpoints_at(tmp_path, (7, 5)) == [older]


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


def test_a_partition_the_checkpoints_hold_but_nothing_committed_is_read_on_from_their_offset():
    """Its owner checkpointed it and died before its commit landed: the next owner's consumer
    would read it from the beginning, applying again what the group already holds."""
    events = _Events({("e", 0): None, ("e", 1): None})
    rewind = GroupRewind({("e", 0): 245, ("e", 1): 0})
    rewind.snapshot(events, "e")
    assert rewind.targets == {("e", 0): (245, None)}  # e-1: the checkpoints hold nothing of it either
    events.assigned = [("e", 0), ("e", 1)]
    rewind.hold(events, events.assigned)
    rewind.settle(events)
    assert events.seeks == [(("e", 0), 245)]

    # Committed by another rank in the meantime: that rank read it on; no seek.
    events = _Events({("e", 0): None})
    rewind = GroupRewind({("e", 0): 245})
    rewind.snapshot(events, "e")
    events.commits[("e", 0)] = 300
    events.assigned = [("e", 0)]
    rewind.hold(events, events.assigned)
    rewind.settle(events)
    assert not events.seeks


def test_a_partition_committed_short_of_the_checkpoints_is_read_on_from_their_offset(caplog):
    """Its owner checkpointed it up to 245 and died before the commit of that checkpoint landed (an
    earlier one committed 100): a new owner would start at 100 and train again what the group's
    model already holds. The log tells this apart from the group going back."""
    events = _Events({("e", 0): 100, ("e", 1): 0, ("e", 2): 50})
    rewind = GroupRewind({("e", 0): 245, ("e", 1): 80, ("e", 2): 40})
    caplog.set_level("INFO", logger="stream.worker")
    rewind.snapshot(events, "e")
    assert rewind.targets == {("e", 0): (245, 100), ("e", 1): (80, 0), ("e", 2): (40, 50)}
    assert "behind its commits: [('e', 2)]" in caplog.text
    assert "hold more than was committed: [('e', 0), ('e', 1)]" in caplog.text
    events.assigned = [("e", 0), ("e", 1), ("e", 2)]
    rewind.hold(events, events.assigned)
    rewind.settle(events)
    assert events.seeks == [(("e", 0), 245), (("e", 1), 80), (("e", 2), 40)]
    assert "e[0]: reading on from offset 245" in caplog.text and "committed only up to 100" in caplog.text
    assert "e[2]: reading again from offset 40" in caplog.text
