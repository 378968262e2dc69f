"""The compact reservoir keeps Avalanche's sampling but holds only its own samples."""

from __future__ import annotations

import numpy as np
import torch
from avalanche.training.storage_policy import ReservoirSamplingBuffer

from learners.experience import make_experience
from learners.replay_buffer import CompactReservoirBuffer


def _experience(start: int, n: int, length: int = 4):
    rows = np.arange(start, start + n * length).reshape(n, length) % 997
    weights = np.full((n, length), 0.25, np.float32)
    items = np.arange(start, start + n)
    return make_experience(rows, weights, items, 0).dataset


def _items(buffer) -> list[int]:
    return [int(buffer[i][2]) for i in range(len(buffer))]


def test_same_samples_as_avalanche_and_one_flat_dataset():
    plain, compact = ReservoirSamplingBuffer(max_size=50), CompactReservoirBuffer(max_size=50)
    for k in range(12):
        data = _experience(1000 * k, 30)
        torch.manual_seed(k)
        plain.update_from_dataset(data)
        torch.manual_seed(k)
        compact.update_from_dataset(data)
    assert len(compact.buffer) == 50
    assert _items(compact.buffer) == _items(plain.buffer)
    assert torch.equal(compact._buffer_weights, plain._buffer_weights)
    # Avalanche's buffer references every experience it saw; the compact one only its own copy.
    assert len(plain.buffer._flat_data._datasets) == 12
    assert len(compact.buffer._flat_data._datasets) == 1
    rows, weights, item, _task = compact.buffer[0]
    assert rows.shape == (4,) and weights.dtype == torch.float32 and int(item) >= 0
