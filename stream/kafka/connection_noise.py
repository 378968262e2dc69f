"""kafka-python's per-attempt connection errors, replaced by one line when Kafka goes and one when it is back.

While a broker is down, kafka-python logs every failed connection attempt at
ERROR, several a second, some with a traceback (``ConnectionResetError``,
``ECONNREFUSED``). The worker retries on its own and counts the failures
(``recstream_broker_errors_total``), so those lines tell an operator nothing
new and bury everything else. ``ConnectionNoiseFilter`` drops exactly those
records (a kafka logger, and a connection failure by its exception or its
message); every other kafka-python error still shows. It tells ``OutageLog``
of each, which logs one WARNING once failures have gone on for
``GRACE_S`` (a single dropped connection that reconnects at once is no
outage), and one INFO with the outage's length at the next successful
connection, which kafka-python logs at INFO on the connection loggers.

    quiet_connection_noise("kafka-1:9092")   # after logging is configured
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Callable, Optional

log = logging.getLogger("stream.worker")

# Failures for this long before they count as an outage (kafka-python retries within a second).
GRACE_S = 2.0
# A failure this long after the previous one starts a new episode (an outage keeps failing every
# few seconds at most: the clients reconnect at least that often while the worker polls).
EPISODE_GAP_S = 30.0

_KAFKA = "kafka"
# Where kafka-python says a connection was made: INFO, below the WARNING the worker keeps for kafka.
_CONNECTION_LOGGERS = ("kafka.net.connection", "kafka.conn")
_CONNECTED = re.compile(r": (Connected|Connection complete\.)$")
_FAILURE = re.compile(
    r"KafkaConnectionError|NodeNotReadyError|NoBrokersAvailable|socket disconnected|ECONNREFUSED|ECONNRESET"
    r"|Connection (refused|reset|lost|failed)|Connect attempt|Unable to connect|DNS lookup failed"
    r"|Broken pipe|Error (receiving|sending) (network|request) data"
    r"|Bootstrap (connection|attempt) .*failed|Bootstrap failed|Bootstrap \S+ not ready|Unable to bootstrap",
    re.IGNORECASE)
_ERROR = re.compile(r"\w+Error(: [^\[\]()]*)?")


def _is_connection_error(exc: Optional[BaseException]) -> bool:
    if exc is None:
        return False
    if isinstance(exc, OSError):  # ConnectionResetError, ConnectionRefusedError, BrokenPipeError, socket timeouts
        return True
    return type(exc).__name__ in ("KafkaConnectionError", "NodeNotReadyError", "NoBrokersAvailable")


def _is_kafka(name: str) -> bool:
    return name == _KAFKA or name.startswith(_KAFKA + ".")


def is_connection_failure(record: logging.LogRecord) -> bool:
    """Whether this is a kafka-python record about one failed or lost connection."""
    if not _is_kafka(record.name):
        return False
    if record.exc_info and _is_connection_error(record.exc_info[1]):
        return True
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a record that cannot be formatted is left to the handler
        return False
    return bool(_FAILURE.search(message))


def is_connected(record: logging.LogRecord) -> bool:
    """Whether this is kafka-python saying a connection to a broker was made."""
    if record.name not in _CONNECTION_LOGGERS:
        return False
    try:
        return bool(_CONNECTED.search(record.getMessage()))
    except Exception:  # noqa: BLE001
        return False


class OutageLog:
    """One WARNING when Kafka becomes unreachable, one INFO with the outage's length when it is back."""

    def __init__(self, where: Optional[str] = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.where = f"Kafka at {where}" if where else "Kafka"
        self._clock = clock
        self._lock = threading.Lock()
        self._since: Optional[float] = None  # first failure of the current episode
        self._last = 0.0
        self._first_error = ""
        self._warned = False

    @property
    def unreachable(self) -> bool:
        """Whether the unreachable WARNING went out and no connection has succeeded since."""
        return self._warned

    def failed(self, detail: str) -> None:
        now = self._clock()
        with self._lock:
            if self._since is None or (not self._warned and now - self._last > EPISODE_GAP_S):
                self._since, self._first_error = now, detail
            self._last = now
            if self._warned or now - self._since < GRACE_S:
                return
            self._warned = True
        log.warning("%s is unreachable (%s): the worker keeps retrying and counts the failures in "
                    "recstream_broker_errors_total; the client's per-attempt errors are not logged",
                    self.where, self._first_error)

    def connected(self) -> None:
        now = self._clock()
        with self._lock:
            since, warned = self._since, self._warned
            self._since, self._warned = None, False
        if warned:
            log.info("%s is reachable again after %.1f s", self.where, now - since)


class ConnectionNoiseFilter(logging.Filter):
    """A handler filter: drops kafka-python's per-attempt connection errors and the INFO records of the
    connection loggers (lowered only to see connections succeed), and tells ``outage`` of both."""

    def __init__(self, outage: OutageLog, floors: Optional[dict[str, int]] = None) -> None:
        super().__init__()
        self.outage = outage
        self.floors = floors or {}  # logger name -> the level its records showed at before

    def filter(self, record: logging.LogRecord) -> bool:
        if not _is_kafka(record.name):
            return True
        if is_connection_failure(record):
            self.outage.failed(_detail(record))
            return False
        if is_connected(record):
            self.outage.connected()
        return record.levelno >= self.floors.get(record.name, logging.NOTSET)


def _detail(record: logging.LogRecord) -> str:
    """The error a failure record names, e.g. ``KafkaConnectionError: 111 ECONNREFUSED``."""
    if record.exc_info and record.exc_info[1] is not None:
        exc = record.exc_info[1]
        return f"{type(exc).__name__}: {exc}"[:200]
    message = record.getMessage()
    match = _ERROR.search(message)
    return (match.group(0) if match else message.rsplit(": ", 1)[-1])[:200].strip(" .")


def quiet_connection_noise(where: Optional[str] = None) -> ConnectionNoiseFilter:
    """Install the filter on every handler of the root logger (records of kafka's child loggers reach
    only the handlers, not the parents' filters); call it after logging is configured."""
    floors = {}
    for name in _CONNECTION_LOGGERS:
        logger = logging.getLogger(name)
        floors[name] = logger.getEffectiveLevel()
        if floors[name] > logging.INFO:
            logger.setLevel(logging.INFO)
    noise = ConnectionNoiseFilter(OutageLog(where), floors)
    for handler in logging.getLogger().handlers:
        handler.addFilter(noise)
    return noise
