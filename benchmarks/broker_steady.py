"""How the embedded broker itself holds up under the bench's steady load, with no worker.

    python benchmarks/broker_steady.py                  # 480 s, prints a line every 30 s
    python benchmarks/broker_steady.py --seconds 120
    python benchmarks/broker_steady.py --linger-ms 50   # fewer, larger batches

``recstream bench``'s freshness run shares the machine between the embedded
tansu broker (memory storage), the worker, and the bench's own producer and
reader. This script keeps the broker's side of that load and drops the
worker: one producer sends 1,000 small events/s, a second writes 1,000
vector-sized (~1 KB) records/s, and a plain kafka-python consumer in a group
tails the events. Every 30 s it prints what was consumed, the lag, the worst
produce -> consume latency of the window, and the broker's CPU (share of one
core, from /proc). If the broker's CPU climbs as the run goes on, that share
is gone from what the worker can have on a small machine.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
import uuid

from kafka import KafkaConsumer, KafkaProducer

from stream.kafka.broker import EmbeddedBroker, ensure_topics


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def produce(bootstrap: str, topic: str, rate: float, pad: int, stop_at: float, sent: list[int],
            linger_ms: int) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=linger_ms, acks="all")
    started, n = time.time(), 0
    while time.time() < stop_at:
        due = int((time.time() - started) * rate)
        while n < due:
            value = json.dumps({"event_id": f"e{n}", "user_id": f"u{n % 10_000}", "item_id": f"i{n % 1_000}",
                                "event_type": "click", "ts": time.time(), "pad": "x" * pad}).encode()
            producer.send(topic, key=f"u{n % 10_000}".encode(), value=value)
            n += 1
        sent[0] = n
        time.sleep(0.005)
    producer.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=480.0)
    parser.add_argument("--rate", type=float, default=1000.0, help="events/s, and as many vector records/s")
    parser.add_argument("--linger-ms", type=int, default=5,
                        help="both producers' linger: larger means fewer, larger batches stored by the broker")
    args = parser.parse_args()
    with EmbeddedBroker() as broker:
        bootstrap, pid = broker.bootstrap, broker._proc.pid  # noqa: SLF001 - our own broker process
        ensure_topics(bootstrap, {"events": 4, "vectors": 4})
        stop_at = time.time() + args.seconds
        events_sent, vectors_sent = [0], [0]
        for topic, pad, sent in (("events", 0, events_sent), ("vectors", 1000, vectors_sent)):
            threading.Thread(target=produce, args=(bootstrap, topic, args.rate, pad, stop_at, sent, args.linger_ms),
                             daemon=True).start()
        consumer = KafkaConsumer("events", bootstrap_servers=bootstrap, group_id=f"steady-{uuid.uuid4().hex[:6]}",
                                 auto_offset_reset="earliest", enable_auto_commit=False, max_poll_records=2000,
                                 fetch_max_wait_ms=50, max_poll_interval_ms=5000)
        consumed, worst, window_start, cpu_start = 0, 0.0, time.time(), cpu_seconds(pid)
        started = window_start
        while time.time() < stop_at:
            for records in consumer.poll(timeout_ms=200).values():
                now = time.time()
                worst = max([worst, *(now - r.timestamp / 1000.0 for r in records)])
                consumed += len(records)
            if time.time() - window_start >= 30:
                now, cpu = time.time(), cpu_seconds(pid)
                print(f"t={now - started:4.0f}s  consumed {consumed:>8,}  lag {events_sent[0] - consumed:>7,}  "
                      f"worst {worst:6.2f} s  broker cpu {(cpu - cpu_start) / (now - window_start):4.0%}", flush=True)
                window_start, cpu_start, worst = now, cpu, 0.0
        consumer.close()


if __name__ == "__main__":
    main()
