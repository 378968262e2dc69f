"""A scripted stand-in for ``KafkaConsumer``, shared by the tests that run ``KafkaSource`` without a broker."""

from __future__ import annotations


class FakeConsumer:
    """Enough of KafkaConsumer for KafkaSource: scripted polls, pause state, offsets the test sets."""

    def __init__(self, polls=(), assigned=()):
        self.polls = list(polls)  # each a dict or an exception to raise
        self.poll_calls = 0
        self.commits = []
        self.paused_set = set()
        self.assigned = set(assigned)
        self.highwaters = {}
        self.positions = {}
        self.listener = None
        self.closed = False

    def poll(self, timeout_ms=0):
        self.poll_calls += 1
        # As with Kafka, paused partitions fetch nothing (tests pause all their partitions at once).
        if self.paused_set or not self.polls:
            return {}
        item = self.polls.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    def subscribe(self, topics, listener=None):
        self.listener = listener

    def assignment(self):
        return set(self.assigned)

    def pause(self, *tps):
        self.paused_set.update(tps)

    def resume(self, *tps):
        self.paused_set.difference_update(tps)

    def paused(self):
        return set(self.paused_set)

    def commit(self, offsets):
        self.commits.append(offsets)

    def highwater(self, tp):
        return self.highwaters.get(tp)

    def position(self, tp, timeout_ms=None):
        return self.positions.get(tp)

    def close(self, autocommit=True):
        self.closed = True
