"""The long-running worker: the loop that wires its parts together.

One turn of the loop: read item texts (cold-start vectors go out at once),
read a batch of events (validate, de-duplicate, apply to user state, publish
the touched users' vectors), train one experience when enough events wait,
republish the items the update moved, checkpoint when due and then commit
exactly the offsets that checkpoint covers. By default an experience trains
on a background thread while the loop goes on consuming and publishing user
vectors (an experience takes seconds on a CPU: between polls, that would be
the event -> vector latency); with ``background_training`` off it trains
between polls, keeping the group alive with paused keepalive polls.

The parts, each owning its state (the way quix-streams' ``Application``
composes a consumer, a producer and a checkpoint):

- ``ingest``: records in, applied offsets, de-duplication, the stash;
- ``publisher``: the producer, vectors, dead letters, delivery, model versions out;
- ``trainer``: when and where an experience trains, keepalive, backpressure;
- ``checkpointer``: checkpoints, commits, restore, rollback, their cadence;
- ``forgetting``: forget requests applied between experiences (erasure, tombstone);
- ``membership``: the consumer-group callbacks, talking to the parts above.

They share ``totals``, the ``consumers`` and the ``dead_letter_book``.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

from kafka import KafkaConsumer
from kafka.errors import KafkaError

from learners.learner import ContinualRecommender
from stream.config import Settings
from stream.distributed_setup import rank_state_dir
from stream.kafka.clients import KafkaSource
from stream.kafka.errors import BrokerError
from stream.kafka.items import ItemsFollower
from stream.kafka.origin import ForeignCheckpointError, StreamOrigin, check_checkpoint_origin, fetch_cluster_id
from stream.kafka.sinks import make_producer
from stream.learner_setup import learner_config, set_torch_threads
from stream.metrics import WorkerMetrics
from stream.worker import heap
from stream.worker.checkpointer import Checkpointer
from stream.worker.consumers import Consumers
from stream.worker.dead_letter_book import DeadLetterBook
from stream.worker.forgetting import Forgetting
from stream.worker.group_join import join_group, rank_0_folder
from stream.worker.group_restore import (GroupRewind, RankMustRestart, RanksDisagree, common_mark, group_offsets,
                                        held_marks)
from stream.worker.handover import PartitionHandover
from stream.worker.ingest import Ingest
from stream.worker.lifecycle import Lifecycle
from stream.worker.membership import Membership
from stream.worker.online_eval import OnlineEval
from stream.worker.publisher import BOOTSTRAP_TIMEOUT_MS, RETRY_FIRST_S, RETRY_MAX_S, Publisher, Undelivered
from stream.worker.totals import Totals
from stream.worker.trainer import Trainer

log = logging.getLogger("stream.worker")

_LAG_EVERY_S = 5.0
_WATCH_IDLE_S = 15.0
# A missing forget topic is looked for again this often, and said at most every _FORGET_WARN_S.
_FORGET_RETRY_S = 5.0
_FORGET_WARN_S = 30.0


class Worker:
    def __init__(self, settings: Settings, *, learner: Optional[ContinualRecommender] = None,
                 metrics: Optional[WorkerMetrics] = None, fresh_broker: bool = False, group=None) -> None:
        """``fresh_broker``: the cluster is the demo's embedded broker, empty on every start.
        ``group``: a ``stream.worker.group_turns.GroupTurns`` (``--distributed``): one model across ranks."""
        self.settings = settings
        self.metrics = metrics or WorkerMetrics()
        self.group = group
        self.learner = learner or ContinualRecommender(
            learner_config(settings), collective=group.collective if group is not None else None)
        self.metrics.replay_capacity.set(settings.replay_size)
        self.totals = Totals()
        self.lifecycle = Lifecycle(self.metrics)
        self.consumers = Consumers()
        self.dead_letter_book = DeadLetterBook()
        parts = (settings, self.learner, self.metrics)
        self.publisher = Publisher(*parts, self.totals, self.dead_letter_book, self.lifecycle)
        self.handover = PartitionHandover(*parts, self.publisher)
        self.ingest = Ingest(*parts, self.totals, self.consumers, self.publisher, self.dead_letter_book,
                             self.handover, fresh_broker=fresh_broker)
        self.trainer = Trainer(*parts, self.consumers, self.ingest, self.publisher,
                               on_trained=self._on_trained)
        if isinstance(self.learner, ContinualRecommender):  # a stand-in learner (tests) has no model
            self.ingest.online_eval = OnlineEval(self.learner, self.metrics, settings.online_eval_window)
            if group is None and settings.guard_tolerance < 1:  # one group model: no undo alone
                self.learner.guard_updates(settings.guard_tolerance)
        self.forgetting = Forgetting(*parts, self.consumers, self.publisher, on_erased=self._on_erased)
        self.checkpointer = Checkpointer(*parts, self.totals, self.consumers, self.ingest, self.publisher,
                                         self.trainer, self.dead_letter_book, self.forgetting, self.handover)
        if group is not None:  # item vectors go out from the agreed turns, rank 0's only
            self.publisher.publishes_items = group.publishes_items
            self.ingest.defer_item_vectors = True
            self.checkpointer.world_size = group.world_size
            # The group's weights, the same on every rank, are linked from rank 0's folder where reachable.
            self.checkpointer.store.peer = rank_0_folder(group.collective, settings.state_dir,
                                                         rank_state_dir(settings.state_dir.parent, 0))
        self.membership = Membership(self.metrics, self.consumers, self.trainer, self.checkpointer,
                                     self.lifecycle, self.handover)
        self.connected = False
        self._idle_since: Optional[float] = None
        self._last_topic_check = 0.0
        self._last_lag = 0.0
        self._last_progress = time.monotonic()
        self.rewind: Optional[GroupRewind] = None  # --distributed: partitions to read again from the checkpoints
        self._has_checkpoint = self._restore()
        self._progress_consumed = self.totals.consumed  # the first rate counts this process's records only

    def _restore(self) -> bool:
        """The newest checkpoint; with ``--distributed`` the newest of the newest model version and
        group turn every rank has (and the offsets the group's checkpoints hold, to read again what
        a rank that went back gave up)."""
        if self.group is None:
            return self.checkpointer.restore()
        collective, state_dir = self.group.collective, self.settings.state_dir
        joined = join_group(collective, self.checkpointer.store, collective.gather_objects(held_marks(state_dir)))
        marks = collective.gather_objects(held_marks(state_dir))  # every rank, so collectives meet in one order
        restored = self.checkpointer.restore(common_mark(marks, f"{state_dir.parent}/rank-*"))
        if joined:
            self.totals.load({})  # the counts of the rank it started from are not its own
        self.rewind = GroupRewind(group_offsets(collective.gather_objects(self.checkpointer.covered_offsets)))
        self.membership.rewind = self.checkpointer.rewind = self.rewind
        return restored

    # The clients, as the parts see them.

    @property
    def events(self) -> Optional[KafkaSource]:
        return self.consumers.events

    @property
    def items(self) -> Optional[ItemsFollower]:
        return self.consumers.items

    def attach(self, events: Optional[KafkaSource], items: Optional[ItemsFollower], producer,
               forget: Optional[ItemsFollower] = None) -> None:
        """Read from and send through these clients (None: connection given up)."""
        self.consumers.events, self.consumers.items, self.consumers.forget = events, items, forget
        self.publisher.attach(producer)

    def checkpoint(self, in_rebalance: bool = False, wait: bool = True, agreed: bool = False) -> bool:
        """Save everything applied so far and commit it (see ``Checkpointer.checkpoint``).

        ``agreed`` (``--distributed``): every rank checkpoints in this turn, so the ranks first share
        where each is on its partitions, and every rank's checkpoint names the group's offsets."""
        if agreed and self.group is not None and self.rewind is not None:
            covered = self.rewind.covered(self.ingest.applied)
            self.rewind.learn_group(self.group.collective.gather_objects(covered))
        return self.checkpointer.checkpoint(in_rebalance=in_rebalance, wait=wait, agreed=agreed)

    def _on_trained(self) -> None:
        """An experience changed the model (on either thread): the next checkpoint has it to save."""
        self.checkpointer.mark_dirty()

    def _on_erased(self) -> None:
        """Users were erased (loop thread): checkpoint at once, then drop the older checkpoints."""
        self.checkpointer.note_erasure()

    def connect(self) -> None:
        """Reach Kafka (waiting, with backoff, for as long as it takes), then make sure a restart
        will not repeat what already reached the dead-letter topic. Returns early on ``stop()``."""
        s = self.settings
        if s.metrics_port and not self.metrics.serving:  # serve while waiting for Kafka
            port = self.metrics.serve(s.metrics_port)
            log.info("metrics on http://0.0.0.0:%d/metrics", port)
        set_torch_threads(s)
        self.trainer.start()
        self.checkpointer.writer()
        if not self._retry("connect", f"reaching Kafka at {s.bootstrap_servers}", self._open_clients,
                           cleanup=self._close_clients):
            return
        try:
            check_checkpoint_origin(self.checkpointer.origin, self.checkpointer.saved_origin, s.state_dir)
        except ForeignCheckpointError:
            self.close()
            raise
        if not self._retry("dlq_scan", f"reading the dead-letter topic {s.dlq_topic!r}",
                           self.checkpointer.recover_dead_letters):
            return
        if not self._has_checkpoint:
            # A first checkpoint before any record is read: there is always one to go back to
            # (see _roll_back), and a restart knows where to read the dead-letter topic from.
            self.checkpointer.mark_dirty()
            self.checkpoint()
        if self.group is not None:  # one model, one version sequence for the group
            if not self.group.check_weights(self.learner):  # logs each rank's restored version
                self.close()
                raise RanksDisagree(
                    f"the ranks restored different models from their checkpoints ({s.state_dir.parent}/rank-*): "
                    "start every rank from checkpoints of the same model version (keep in each rank's folder "
                    "only the ckpt-<version>-* folders of a version all ranks have), or remove every rank's "
                    "folder to start the group over")
            self.learner.model_version = self.group.max_version(self.learner.model_version)
        self.connected = True
        # The model, the clients and the libraries stay for the whole run: a full garbage
        # collection would walk them all again each time, holding the GIL (stream/worker/heap.py).
        log.info("%d startup objects exempt from garbage collection", heap.freeze_startup_objects())

    def _open_clients(self) -> None:
        s = self.settings
        quick = {"bootstrap_timeout_ms": BOOTSTRAP_TIMEOUT_MS}
        producer = make_producer(s, **quick)
        self.publisher.attach(producer)
        events = KafkaSource.from_settings(s, on_error=self.metrics.broker_error, **quick)
        self.consumers.events = events
        m = self.membership
        events.subscribe([s.events_topic], on_assigned=m.on_assigned, on_revoked=m.on_revoked, on_lost=m.on_lost)
        items_consumer = KafkaConsumer(**s.reader_kwargs("items"), **quick)
        self.consumers.items = ItemsFollower(items_consumer, s.items_topic, self.ingest.item_start,
                                             on_error=self.metrics.broker_error)
        forget_consumer = KafkaConsumer(**s.reader_kwargs("forget"), **quick)
        self.consumers.forget = ItemsFollower(forget_consumer, s.forget_topic, self.forgetting.start,
                                              on_error=self.metrics.broker_error, retry_s=_FORGET_RETRY_S,
                                              name="forget", warn_s=_FORGET_WARN_S)
        self.handover.open(events)
        self.checkpointer.origin = StreamOrigin.of(s, fetch_cluster_id(s, BOOTSTRAP_TIMEOUT_MS))
        if self.rewind is not None:  # before anything is read: the commits at start
            self.rewind.snapshot(events, s.events_topic)
        log.info("connected to Kafka at %s (cluster %s)", s.bootstrap_servers, self.checkpointer.origin.cluster_id)

    def _close_clients(self) -> None:
        for part in (self.consumers.events, self.consumers.items, self.consumers.forget, self.handover):
            if part is not None:
                try:
                    part.close()
                except Exception:  # noqa: BLE001 - half-built clients of a failed attempt
                    pass
        try:
            self.publisher.close(timeout=1)
        except Exception:  # noqa: BLE001
            pass
        self.attach(None, None, None)

    def _retry(self, operation: str, what: str, attempt, cleanup=None) -> bool:
        """Call ``attempt`` until it succeeds (True) or ``stop()`` is asked for (False)."""
        delay = RETRY_FIRST_S
        while not self.lifecycle.stopping:
            try:
                attempt()
                return True
            except (BrokerError, KafkaError, OSError) as exc:
                if cleanup is not None:
                    cleanup()
                self.metrics.broker_error(operation, exc)
                log.warning("%s failed (%s: %s); retrying in %.1fs", what, type(exc).__name__, exc, delay)
                self.lifecycle.sleep(delay)
                delay = min(2 * delay, RETRY_MAX_S)
        return False

    def stop(self) -> None:
        """Ask the loop to finish the turn in hand, checkpoint, commit and return."""
        self.lifecycle.asked_to_stop = True
        self.lifecycle.stopping = True

    def run(self) -> int:
        if not self.connected:
            self.connect()
        try:
            if self.connected:
                try:
                    while not self.lifecycle.stopping:
                        self.turn()
                    self._drain()
                    self._leave_or_stay()
                except Undelivered as exc:
                    # Exactly-once still holds: the last checkpoint and its committed offsets stand,
                    # and the next start redoes what came after them.
                    log.error("stopping while Kafka refuses our output (%s): no final checkpoint; the next "
                              "start resumes from the last one", exc)
        finally:
            self.close()
        return 0

    def close(self) -> None:
        self.lifecycle.closing = True  # leaving the group revokes partitions: already checkpointed
        self.trainer.shutdown()  # an experience in flight finishes first
        self.checkpointer.shutdown()  # and a checkpoint write in flight
        heap.thaw()
        for part in (self.consumers.events, self.consumers.items, self.consumers.forget, self.handover):
            if part is not None:
                part.close()
        try:
            self.publisher.close(timeout=10)
        except KafkaError as exc:
            log.warning("closing the producer failed: %s", exc)
        self.metrics.close()

    @property
    def _busy(self) -> bool:
        """An experience is training or a checkpoint is being prepared: the model must stay as it is."""
        return self.trainer.training or self.checkpointer.holds_learner

    def turn(self) -> None:
        self.metrics.beat()
        events, ingest, publisher = self.consumers.events, self.ingest, self.publisher
        trainer, checkpointer = self.trainer, self.checkpointer
        trainer.collect()
        checkpointer.collect()
        # While a group join is in flight, nothing slow between polls: the client drops a join
        # that completes outside poll() (KafkaSource.next_batch).
        joining = events.joining()
        if not self._busy and not joining and ingest.read_items():  # add_items runs the model: never
            checkpointer.note_items()  # while it trains or is being prepared
        if not self._busy and not joining:  # erasing changes what training and a checkpoint's prepare read
            self.forgetting.apply()
        if events.rejoin_pending() and events.assignment():
            self.membership.before_rebalance()
        timeout = 50 if self.learner.pending or publisher.has_queued_users else 500
        records = ingest.poll(timeout)
        if self.rewind is not None and self.rewind.held:  # assigned in that poll: seek before reading them
            self.rewind.settle(events)
        if self.handover.holding:  # assigned in that poll: where they are read from, their users' histories
            starts = self.handover.settle(events, ingest.applied, ingest.remember_ids,
                                          frozenset(self.rewind.held if self.rewind else ()))
            for tp, start in starts.items():
                ingest.taken_over(tp, start)
        checkpointer.note_poll(len(records) >= self.settings.max_poll_records)
        if checkpointer.rollback_reason:  # set by a rebalance callback inside that poll
            self._roll_back()
        records = ingest.with_stash(records)  # records a keepalive poll returned during training first
        self._watch_idle(records)
        if records:
            checkpointer.note_events(ingest.apply_events(records))
        publisher.publish_queued_users()
        publisher.deliver_refused()
        checkpoint_due = checkpointer.due()
        if self.group is not None:
            self._group_turn(checkpoint_due)
        else:
            if not self._busy and not checkpoint_due and trainer.due() and not events.rejoin_pending():
                trainer.train()  # (not while the group waits for this member to rejoin)
            trainer.backpressure()
            if checkpoint_due and not self._busy:  # a checkpoint waits for the experience in flight
                checkpointer.checkpoint(wait=False)  # written off the loop, committed by a later turn
        if time.monotonic() - self._last_lag >= _LAG_EVERY_S:
            self._update_lag()
        if time.monotonic() - self._last_progress >= self.settings.progress_interval_s:
            self._progress()

    def _group_turn(self, checkpoint_due: bool) -> None:
        """``--distributed``: what this turn does is the group's (stream/worker/group_turns.py)."""
        turn = self.group.agree(train=self.trainer.due(), checkpoint=checkpoint_due, busy=self._busy,
                                rejoining=self.consumers.events.rejoin_pending(),
                                catalogue=self.learner.rows_waiting or self.ingest.item_texts_changed,
                                stop=self.lifecycle.stopping)
        if turn.stop:
            self.lifecycle.stopping = True  # every rank drains in the same turn
        if not turn.busy:
            train = turn.train and not turn.checkpoint and not turn.rejoining
            if turn.catalogue:  # before any checkpoint too: events waiting for rows are in no state yet
                self._catalogue_round(publish_items=not train)
            if train:
                self.trainer.train()
            if turn.checkpoint:
                self.checkpoint(wait=False, agreed=True)
        self.trainer.backpressure()

    def _catalogue_round(self, publish_items: bool) -> None:
        """Every rank: new ids get their agreed rows and what waited for them is applied; item
        vectors the new texts moved go out (rank 0) under a new model version, the same on every
        rank, so one (item, version) names one vector."""
        learner = self.learner
        self.ingest.item_texts_changed = False
        released = learner.agree_rows()
        if released:
            self.publisher.publish_users(released)
            self.checkpointer.mark_dirty()
        if not publish_items:
            return  # the training round that follows publishes them
        with learner.lock:
            moved = learner.items_to_publish(self.settings.item_publish_min_change)
        if self.group.any(bool(len(moved[0])) and self.group.publishes_items):
            with learner.lock:
                learner.model_version += 1
                self.publisher.publish_items(moved, learner.model_version)
            self.metrics.model_version.set(learner.model_version)
            self.checkpointer.mark_dirty()

    def _roll_back(self) -> None:
        """Go back to the last checkpoint (see ``Checkpointer.roll_back``): no experience may be in
        flight meanwhile, and the users queued for publishing have their events read again."""
        reason = self.checkpointer.take_rollback_reason()
        if self.group is not None:
            # One rank going back alone would leave its weights behind the group's: the group goes
            # back together instead, as after a killed rank (stream/worker/group_restore.py).
            raise RankMustRestart(
                f"{reason}: this rank's state holds records it gave up uncommitted, and going back to its "
                "last checkpoint alone would leave its weights behind the other ranks'. Exiting so that "
                "torchrun restarts every rank from the newest checkpoint they all have (launch it with "
                "--max-restarts N)")
        self.trainer.collect(wait=True)
        self.checkpointer.roll_back(reason)
        self.publisher.drop_queued_users()
        self.metrics.pending.set(self.learner.pending)

    def _drain(self) -> None:
        log.info("stopping: training what is pending, checkpointing and committing")
        self.trainer.collect(wait=True)
        self.checkpointer.collect(wait=True)
        if self.checkpointer.rollback_reason:
            self._roll_back()
        if self.group is not None:  # every rank, in the same turn: the last round and the same weights
            self._catalogue_round(publish_items=True)
            self.trainer.train()
            self.group.check_weights(self.learner)
        elif self.learner.pending:
            self.trainer.train()
            self.trainer.collect(wait=True)
        self.checkpointer.mark_dirty()
        self.checkpoint(agreed=self.group is not None)  # every rank drains in the same turn

    def _leave_or_stay(self) -> None:
        """``--distributed``: the group drained together because some rank was asked to stop. One
        asked too stops here; one that was not (its node stays: another node is scaled away) exits
        so that torchrun restarts it and the group re-forms without the leaver, from the checkpoint
        just taken together. Under one torchrun every rank is asked at once, and all stop."""
        if self.group is None or self.lifecycle.asked_to_stop:
            return
        raise RankMustRestart(
            f"rank {self.group.rank}: another rank of the group was asked to stop and leaves; everything is "
            "checkpointed and committed. Exiting so that torchrun restarts this rank and the group re-forms "
            "without it (launch torchrun with --max-restarts N)")

    def _watch_idle(self, records: list) -> None:
        """When nothing has arrived for a while, say clearly why (and count it if Kafka does not answer)."""
        now = time.monotonic()
        if records or self._idle_since is None:
            self._idle_since = now
            return
        idle = now - self._idle_since
        if idle < _WATCH_IDLE_S or now - self._last_topic_check < _WATCH_IDLE_S:
            return
        self._last_topic_check = now
        topic = self.settings.events_topic
        events = self.consumers.events
        exists = events.topic_exists(topic)  # fresh metadata: also lets the group see a new topic
        if exists is None:
            log.warning("no records for %.0fs and Kafka at %s does not answer: waiting for it",
                        idle, self.settings.bootstrap_servers)
        elif not exists:
            log.warning("events topic %r does not exist (yet): waiting for it", topic)
        elif not events.assignment():
            log.info("no partition of %r assigned for %.0fs (group %r rebalancing, or every partition taken "
                     "by other members): waiting", topic, idle, self.settings.group_id)

    def _progress(self) -> None:
        now = time.monotonic()
        rate = (self.totals.consumed - self._progress_consumed) / max(now - self._last_progress, 1e-9)
        self._last_progress, self._progress_consumed = now, self.totals.consumed
        m = self.metrics
        log.info("%.0f events/s | consumed %d (valid %d, dead-lettered %d, duplicates %d) | model v%d "
                 "| loss %.3f | users %d items %d | pending %d", rate, self.totals.consumed, self.totals.valid,
                 self.totals.dead_lettered, self.totals.duplicates, self.learner.model_version,
                 m.train_loss._value.get(), len(self.learner.users), len(self.learner.catalogue),  # noqa: SLF001
                 self.learner.pending)

    def _update_lag(self) -> None:
        self._last_lag = time.monotonic()
        lags = self.consumers.events.lag()
        for topic, lag in lags.items():
            self.metrics.consumer_lag.labels(topic=topic).set(lag)
        self.checkpointer.note_lag(sum(lags.values()))
