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

from avalanche.training.storage_policy import ReservoirSamplingBuffer


class CompactReservoirBuffer(ReservoirSamplingBuffer):
    def update_from_dataset(self, new_data):
        super().update_from_dataset(new_data)
        self.buffer = compact(self.buffer)


def compact(buffer):
    """The same samples, in the same order, as one flat dataset that references nothing else."""
    from learners.checkpoint import _materialise_buffer
    from learners.experience import make_experience

    if len(buffer) == 0:
        return buffer
    rows, weights, items = _materialise_buffer(buffer, 0)
    return make_experience(rows.numpy(), weights.numpy(), items.numpy(), 0).dataset
