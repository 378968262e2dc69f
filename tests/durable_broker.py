"""An embedded tansu broker that keeps its data in S3 (moto's S3 server), for the broker-fault tests.

The memory-only broker comes back empty after a stop; this one finds its topics,
records and committed offsets again when it starts on the same bucket, so a test
can SIGKILL it, freeze it (SIGSTOP/SIGCONT) and start it again on the same port
under a running worker, as a real cluster's broker would come back.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Optional

from stream.kafka.broker import EmbeddedBroker
from worker_harness import free_port


class S3Unavailable(RuntimeError):
    """moto's S3 server cannot run here (the tests that need it skip with this message)."""


def moto_server_binary() -> str:
    """``moto_server`` of this interpreter's environment (pip's ``moto[server]``), else from PATH."""
    beside = Path(sys.executable).with_name("moto_server")
    found = str(beside) if beside.exists() else shutil.which("moto_server")
    if not found:
        raise S3Unavailable("moto_server is not installed (it comes with the test extra: pip install -e '.[test]')")
    return found


class MotoS3:
    """``moto_server`` on a free 127.0.0.1 port: an S3 endpoint in memory, buckets made on demand."""

    def __init__(self, log_path: Path, start_timeout_s: float = 30.0) -> None:
        self.log_path = log_path
        self.start_timeout_s = start_timeout_s
        self.port = 0
        self._proc: Optional[subprocess.Popen] = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "MotoS3":
        binary = moto_server_binary()
        self.port = free_port()
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(self.port)],
                                          stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            try:
                urllib.request.urlopen(self.endpoint, timeout=1).close()
                return self
            except urllib.error.HTTPError:
                return self  # it answers
            except OSError:
                time.sleep(0.2)
        self.stop()
        tail = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
        raise S3Unavailable(f"moto_server did not answer on {self.endpoint} within {self.start_timeout_s:.0f}s:\n"
                            f"{tail}")

    def create_bucket(self, prefix: str = "tansu") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        request = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
        urllib.request.urlopen(request, timeout=10).close()
        return name

    def broker_env(self) -> dict[str, str]:
        """What tansu's S3 storage needs to reach this endpoint (moto takes any keys)."""
        return {"AWS_ENDPOINT": self.endpoint, "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "recstream-test",
                "AWS_SECRET_ACCESS_KEY": "recstream-test", "AWS_DEFAULT_REGION": "us-east-1"}

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class DurableBroker:
    """A tansu broker on one bucket and one port, which a test kills, freezes and starts again."""

    def __init__(self, s3: MotoS3, log_path: Path) -> None:
        self.s3 = s3
        self.bucket = s3.create_bucket()
        self.log_path = log_path
        self.port = free_port()
        self._broker: Optional[EmbeddedBroker] = None
        self._frozen = False

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "DurableBroker":
        """Start on the same storage and port as every time before."""
        if self._broker is None or not self._broker.running:
            self._broker = EmbeddedBroker(port=self.port, log_path=str(self.log_path), start_timeout_s=60,
                                          storage=f"s3://{self.bucket}/", env=self.s3.broker_env()).start()
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown of any kind, as a crashed machine."""
        os.kill(self._broker.pid, signal.SIGKILL)
        self._broker.stop()  # reaps it

    def freeze(self) -> None:
        """SIGSTOP: connections stay open and nothing answers."""
        os.kill(self._broker.pid, signal.SIGSTOP)
        self._frozen = True

    def thaw(self) -> None:
        os.kill(self._broker.pid, signal.SIGCONT)
        self._frozen = False

    def stop(self) -> None:
        if self._broker is not None and self._broker.running:
            if self._frozen:
                self.thaw()
            self._broker.stop()
