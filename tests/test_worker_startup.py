"""Stopping the worker while it starts: SIGTERM during imports and the model load exits 0, quietly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("after_s", [1.0, 4.0])
def test_sigterm_while_the_model_loads_exits_zero_without_a_traceback(tmp_path, after_s):
    env = {**os.environ, "RECSTREAM_BOOTSTRAP_SERVERS": "127.0.0.1:1", "RECSTREAM_STATE_DIR": str(tmp_path),
           "RECSTREAM_METRICS_PORT": "0", "RECSTREAM_DEVICE": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "stream.cli", "worker"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    time.sleep(after_s)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    assert "Traceback" not in text, text
