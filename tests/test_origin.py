"""A checkpoint names the stream it was read from; another stream's checkpoint is refused."""

from __future__ import annotations

import pytest

from stream.config import Settings
from stream.kafka.origin import ForeignCheckpointError, StreamOrigin, check_checkpoint_origin

HERE = StreamOrigin("cluster-a", "recstream", "events", "items")


def test_the_same_stream_is_accepted_and_old_checkpoints_without_an_origin_too(tmp_path):
    check_checkpoint_origin(HERE, HERE.as_dict(), tmp_path)
    check_checkpoint_origin(HERE, None, tmp_path)
    # A broker that reports no cluster id matches on group and topics alone.
    check_checkpoint_origin(StreamOrigin(None, "recstream", "events", "items"), HERE.as_dict(), tmp_path)


@pytest.mark.parametrize("field, value", [("cluster_id", "cluster-b"), ("group_id", "other"),
                                          ("events_topic", "clicks"), ("items_topic", "catalogue")])
def test_another_cluster_group_or_topic_is_refused_with_what_to_do(tmp_path, field, value):
    saved = {**HERE.as_dict(), field: value}
    with pytest.raises(ForeignCheckpointError) as info:
        check_checkpoint_origin(HERE, saved, tmp_path / "state")
    message = str(info.value)
    assert field in message and repr(value) in message
    assert "--state-dir" in message and str(tmp_path / "state") in message


def test_origin_of_settings():
    settings = Settings(group_id="g", events_topic="e", items_topic="i")
    assert StreamOrigin.of(settings, "c") == StreamOrigin("c", "g", "e", "i")
    assert StreamOrigin.from_dict(StreamOrigin.of(settings, None).as_dict()).cluster_id is None
