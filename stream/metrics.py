"""Every Prometheus metric of one worker, on its own registry (no globals).

Names follow ARCHITECTURE.md's table; dashboards and alert rules depend on
them and a test evaluates every dashboard expression against a live worker.
The same HTTP server answers ``/healthz`` (the loop's heartbeat is recent)
and ``/readyz`` (model loaded and partitions assigned).
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from learners.records import BAD_RECORD_REASONS
from stream.kafka.forget import FORGET_REASONS

_FRESHNESS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# The ``operation`` label of recstream_broker_errors_total (stream/worker/, stream/kafka/clients.py, stream/kafka/items.py).
BROKER_OPERATIONS = ("connect", "dlq_scan", "poll", "produce", "commit", "metadata", "items_metadata", "items_poll",
                     "forget_metadata", "forget_poll", "changelog")
# The ``stage`` label of recstream_record_failures_total (stream/worker/isolation.py).
RECORD_FAILURE_STAGES = ("events", "items", "user_vectors", "item_vectors")


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, heartbeat_timeout_s: float = 120.0) -> None:
        self.registry = registry or CollectorRegistry()
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.ready = False
        r = self.registry
        ProcessCollector(registry=r)
        self.events_consumed = Counter("recstream_events_consumed_total", "Event records read from Kafka", registry=r)
        self.events_valid = Counter("recstream_events_valid_total", "Valid events applied", ["event_type"], registry=r)
        self.dead_lettered = Counter("recstream_events_dead_lettered_total", "Records sent to the dead-letter topic",
                                     ["reason"], registry=r)
        self.duplicates = Counter("recstream_events_duplicate_total", "Events ignored as repeated deliveries", registry=r)
        self.events_suspected = Counter(
            "recstream_events_suspected_total", "Events counted at less than full weight on the statistics every "
            "user shares (they still train): repeated_item, new_user (learners.statistics.credibility)", ["reason"], registry=r)
        self.record_failures = Counter(
            "recstream_record_failures_total",
            "Valid records a later stage failed on, set aside so the worker goes on (see the log)", ["stage"],
            registry=r)
        self.users_erased = Counter("recstream_users_erased_total", "Forget requests applied (users erased)",
                                    registry=r)
        self.items_received = Counter("recstream_items_received_total", "Item records applied", registry=r)
        self.pending = Gauge("recstream_pending_events", "Events waiting for the next training experience", registry=r)
        self.train_steps = Counter("recstream_train_steps_total", "Optimizer steps", registry=r)
        self.train_samples = Counter("recstream_train_samples_total", "Samples trained on, replayed ones included",
                                     registry=r)
        self.train_shed = Counter("recstream_train_samples_shed_total",
                                  "Events applied to state but left out of training under overload", registry=r)
        self.train_loss = Gauge("recstream_train_loss", "Mean training loss of the last experience", registry=r)
        self.ewc_penalty = Gauge("recstream_ewc_penalty", "EWC penalty at the last step", registry=r)
        self.train_step_seconds = Histogram("recstream_train_step_seconds", "Time to train one experience",
                                            buckets=_STEP_BUCKETS, registry=r)
        self.replay_samples = Gauge("recstream_replay_buffer_samples", "Samples in the replay buffer", registry=r)
        self.replay_capacity = Gauge("recstream_replay_buffer_capacity_samples", "Replay buffer capacity", registry=r)
        self.vectors_published = Counter("recstream_vectors_published_total", "Vectors published", ["kind"], registry=r)
        self.model_version = Gauge("recstream_model_version", "Model version of published vectors", registry=r)
        self.last_model_update = Gauge("recstream_last_model_update_timestamp_seconds",
                                       "Wall-clock time of the last model update", registry=r)
        self.consumer_lag = Gauge("recstream_consumer_lag_records", "Records behind the log end", ["topic"], registry=r)
        self.event_to_vector = Histogram("recstream_event_to_vector_seconds",
                                         "Event timestamp (Kafka) to publication of the user's vector",
                                         buckets=_FRESHNESS_BUCKETS, registry=r)
        self.item_refresh = Histogram("recstream_item_refresh_seconds",
                                      "Model update finished to touched item vectors published",
                                      buckets=_FRESHNESS_BUCKETS, registry=r)
        self.checkpoints = Counter("recstream_checkpoints_total", "Checkpoints written", registry=r)
        self.checkpoint_failures = Counter("recstream_checkpoint_failures_total", "Checkpoint writes that failed",
                                           registry=r)
        self.checkpoint_fallbacks = Counter("recstream_checkpoint_restore_fallbacks_total",
                                            "Torn or corrupt checkpoints skipped on restore", registry=r)
        self.checkpoint_rollbacks = Counter(
            "recstream_checkpoint_restore_rollbacks_total",
            "Restores that went back past this rank's newest checkpoint to the newest one every rank has "
            "(--distributed)", registry=r)
        self.last_checkpoint = Gauge("recstream_last_checkpoint_timestamp_seconds",
                                     "Wall-clock time of the last checkpoint", registry=r)
        self.changelog_records = Counter(
            "recstream_changelog_records_total",
            "User histories written to the changelog topic at checkpoints", registry=r)
        self.users_adopted = Counter(
            "recstream_users_adopted_total",
            "User histories read from the changelog for partitions newly assigned to this worker", registry=r)
        self.heartbeat = Gauge("recstream_heartbeat_timestamp_seconds", "Last turn of the worker loop", registry=r)
        self.partitions = Gauge("recstream_partitions_assigned", "Partitions assigned to this worker", registry=r)
        self.rebalances = Counter("recstream_rebalances_total", "Partition revocations and assignments", registry=r)
        self.fetch_paused = Gauge("recstream_fetch_paused", "1 while fetching is paused for backpressure", registry=r)
        self.broker_errors = Counter("recstream_broker_errors_total", "Kafka errors by operation", ["operation"],
                                     registry=r)
        # Live quality (stream/worker/online_eval.py): no ids as labels, one series per scorer.
        self.online_recall = Gauge("recstream_online_recall_at_10",
                                   "Recall@10 of the last --online-eval-window scored events, each ranked before "
                                   "it was applied (test, then train)", ["scorer"], registry=r)
        self.online_ndcg = Gauge("recstream_online_ndcg_at_10",
                                 "NDCG@10 of the last --online-eval-window scored events, each ranked before it "
                                 "was applied (test, then train)", ["scorer"], registry=r)
        self.online_scored = Counter("recstream_online_scored_events_total",
                                     "Events ranked before they were applied (a uniform sample)", registry=r)
        self.model_rollbacks = Counter("recstream_model_rollbacks_total",
                                       "Model updates undone (reason=quality: they ranked the newest untrained "
                                       "events worse than the version they replaced)", ["reason"], registry=r)
        # Make every labelled series exist from the start so dashboards show 0, not "no data".
        for kind in ("user", "item"):
            self.vectors_published.labels(kind=kind)
        for event_type in ("click", "favourite", "purchase"):
            self.events_valid.labels(event_type=event_type)
        for operation in BROKER_OPERATIONS:
            self.broker_errors.labels(operation=operation)
        for reason in BAD_RECORD_REASONS + FORGET_REASONS + ("apply_failed", "item_failed", "publish_failed"):
            self.dead_lettered.labels(reason=reason)
        for stage in RECORD_FAILURE_STAGES:
            self.record_failures.labels(stage=stage)
        for scorer in ("model", "popularity"):
            self.online_recall.labels(scorer=scorer)
            self.online_ndcg.labels(scorer=scorer)
        self.model_rollbacks.labels(reason="quality")
        self._server: ThreadingHTTPServer | None = None

    def observe_event_to_vector(self, seconds: list[float]) -> None:
        """One freshness value per event of a batch, in one pass (see ``observe_many``)."""
        observe_many(self.event_to_vector, seconds)

    def beat(self) -> None:
        self.heartbeat.set(time.time())

    def healthy(self) -> bool:
        last = self.heartbeat._value.get()  # noqa: SLF001 - our own gauge
        return last > 0 and time.time() - last < self.heartbeat_timeout_s

    # -- HTTP ------------------------------------------------------------------
    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Start /metrics, /healthz and /readyz on a daemon thread; returns the bound port."""
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server API
                path = self.path.split("?")[0]
                if path == "/metrics":
                    body, ctype, status = generate_latest(metrics.registry), CONTENT_TYPE_LATEST, 200
                elif path == "/healthz":
                    ok = metrics.healthy()
                    body, ctype, status = (b"ok\n" if ok else b"stale heartbeat\n"), "text/plain", 200 if ok else 503
                elif path == "/readyz":
                    ok = metrics.ready
                    body, ctype, status = (b"ready\n" if ok else b"not ready\n"), "text/plain", 200 if ok else 503
                else:
                    body, ctype, status = b"not found\n", "text/plain", 404
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # keep scrapes out of the worker log
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True).start()
        return self._server.server_address[1]

    def broker_error(self, operation: str, exc: Optional[BaseException] = None) -> None:
        """Count one failed broker operation (also the ``on_error`` callback of the Kafka clients)."""
        self.broker_errors.labels(operation=operation).inc()

    @property
    def serving(self) -> bool:
        return self._server is not None

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def observe_many(histogram: Histogram, values: list[float]) -> None:
    """``histogram.observe(v)`` for every value, with one increment per bucket and one for the sum.

    Exactly the buckets and sum the per-value calls give; a per-value call walks the
    buckets in Python under a lock, and the worker makes one per event. Uses prometheus_client's histogram fields; without them, per value.
    """
    if not values:
        return
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if len(values) < 16 or bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for value in values:
            histogram.observe(value)
        return
    import bisect

    counts = [0] * len(bounds)
    for value in values:  # amount <= bound, first match: what observe() does
        counts[bisect.bisect_left(bounds, value)] += 1
    total.inc(sum(values))
    for bucket, count in zip(buckets, counts):
        if count:
            bucket.inc(count)
