"""A reservoir replay buffer whose memory really is bounded.

Avalanche's ``ReservoirSamplingBuffer`` keeps its samples as a view -- a
subset of the concatenation of every experience it has seen -- so each
experience's whole dataset stays alive after the buffer is full, and
indexing walks an ever longer list of leaves. In the worker (an experience
every few seconds) resident memory grew by ~1.6 MB per experience with the
buffer full (``recstream bench``, memory). Here the kept samples are copied
into one flat dataset after every update: memory is the buffer's capacity,
whatever the stream's length; the sampling itself is Avalanche's.
"""

from __future__ import annotations

from typing import Optional

import torch
from avalanche.training.storage_policy import ReservoirSamplingBuffer


class CompactReservoirBuffer(ReservoirSamplingBuffer):
    def update_from_dataset(self, new_data):
        super().update_from_dataset(new_data)
        self.buffer = compact(self.buffer)


def compact(buffer):
    """The same samples, in the same order, as one flat dataset that references nothing else."""
    from learners.experience import make_experience

    if len(buffer) == 0:
        return buffer
    rows, weights, items = buffer_tensors(buffer, 0)
    return make_experience(rows.numpy(), weights.numpy(), items.numpy(), 0).dataset


def buffer_tensors(buffer, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The replay buffer's samples as three tensors (history rows, history weights, item rows), in buffer order.

    ``length`` is the history length, used only for the shapes of an empty buffer.
    """
    n = len(buffer)
    if n == 0:
        return torch.zeros(0, length, dtype=torch.long), torch.zeros(0, length), torch.zeros(0, dtype=torch.long)
    fast = _gather_flat(buffer)
    if fast is not None:
        # Cheap guard against Avalanche internals changing: compare with the public path.
        for i in {0, n // 2, n - 1}:
            sample = buffer[i]
            if not all(torch.equal(fast[k][i], torch.as_tensor(sample[k])) for k in range(3)):
                fast = None
                break
    if fast is not None:
        return fast
    samples = [buffer[i] for i in range(n)]
    return tuple(torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in range(3))  # type: ignore[return-value]


def _gather_flat(buffer) -> Optional[tuple[torch.Tensor, ...]]:
    """Vectorised gather through Avalanche's flattened datasets (None if not applicable)."""
    flat = getattr(buffer, "_flat_data", None)
    datasets = getattr(flat, "_datasets", None)
    if not datasets or _has_transforms(flat):
        return None
    if not all(isinstance(d, torch.utils.data.TensorDataset) and len(d.tensors) >= 3 for d in datasets):
        return None
    try:
        indices = torch.as_tensor(list(flat._get_lazy_indices()), dtype=torch.long)
        return tuple(torch.cat([d.tensors[k] for d in datasets])[indices] for k in range(3))
    except Exception:  # noqa: BLE001 - any surprise: use the slow public path
        return None


def _has_transforms(flat) -> bool:
    try:
        return any(value is not None
                   for attr in ("_transform_groups", "_frozen_transform_groups")
                   for value in getattr(getattr(flat, attr, None), "transform_groups", {}).values())
    except Exception:  # noqa: BLE001
        return True
