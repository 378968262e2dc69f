"""Data-parallel training rounds over torch.distributed: one model on every rank.

``Collective`` is the few collectives a round needs, over the default process
group (gloo on CPU, NCCL on GPU). ``CollectiveRoundsPlugin`` sits on the
strategy's named steps: before an experience the ranks agree on the number of
minibatches (MAX), a rank with fewer runs padding minibatches that contribute
nothing; after backward every gradient is replaced by the sample-weighted
mean over the ranks, before EWC reads it, so importances, anchors, the
optimizer state and the serving average stay identical everywhere.

Zero contribution rather than replay batches on padding steps: the group's
step is then exactly the step one process would take on the union of the
ranks' minibatches (the data-parallel equivalence), where replay batches
would add samples no single process trains on.

Id-table gradients are sparse: their touched rows and values are gathered
(``all_gather``) and summed, which works over NCCL too (NCCL has no sparse
all-reduce).
"""

from __future__ import annotations

import functools
import time

import torch
import torch.distributed as dist
from avalanche.training.plugins import SupervisedPlugin

from learners.towers.optim import gradient_rows

_PIECE_BYTES = 32 << 20  # what one broadcast of a file sends at most


def _timed(method):
    """Add the call's wall time to ``Collective.seconds`` (waiting for the slowest rank included)."""
    @functools.wraps(method)
    def timed(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - started
    return timed


class Collective:
    """The collectives of a training round over the default process group. ``seconds``: the wall
    time spent in them so far, waits for slower ranks included (what the rounds cost this rank)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.seconds = 0.0

    @_timed
    def max_int(self, value: int) -> int:
        t = torch.tensor([int(value)], dtype=torch.long, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    @_timed
    def max_ints(self, values: list[int]) -> list[int]:
        """Element-wise MAX of a few integers over the ranks, in one all-reduce."""
        t = torch.tensor([int(v) for v in values], dtype=torch.long, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [int(v) for v in t.tolist()]

    @_timed
    def gather_objects(self, obj) -> list:
        """Every rank's picklable ``obj``, in rank order (small objects: ids, digests)."""
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    @_timed
    def broadcast_object(self, obj, src: int = 0):
        """Rank ``src``'s picklable ``obj`` on every rank (small objects)."""
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    @_timed
    def broadcast_bytes(self, data: bytes | None, size: int, src: int = 0) -> bytes:
        """Rank ``src``'s ``data`` on every rank; ``size``, its length, every rank knows already.
        Sent in pieces, so a large file costs a piece's memory on the device, not its own."""
        out = bytearray(size)
        view = memoryview(out)
        for start in range(0, size, _PIECE_BYTES):
            end = min(size, start + _PIECE_BYTES)
            if self.rank == src:
                piece = torch.frombuffer(bytearray(data[start:end]), dtype=torch.uint8).to(self.device)
            else:
                piece = torch.empty(end - start, dtype=torch.uint8, device=self.device)
            dist.broadcast(piece, src=src)
            view[start:end] = piece.cpu().numpy().tobytes()
        return bytes(out)

    @_timed
    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    @_timed
    def gather_rows(self, rows: torch.Tensor, values: torch.Tensor | None = None):
        """Every rank's ``rows`` (and ``values`` rows) concatenated in rank order."""
        count = torch.tensor([len(rows)], dtype=torch.long, device=self.device)
        counts = [torch.zeros_like(count) for _ in range(self.world_size)]
        dist.all_gather(counts, count)
        sizes = [int(c.item()) for c in counts]
        width = max(sizes)
        out_rows = self._gather_padded(rows.to(self.device), width, sizes)
        if values is None:
            return out_rows
        return out_rows, self._gather_padded(values.to(self.device), width, sizes)

    def _gather_padded(self, tensor: torch.Tensor, width: int, sizes: list[int]) -> torch.Tensor:
        padded = tensor.new_zeros((width, *tensor.shape[1:]))
        padded[: len(tensor)] = tensor
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class PaddedBatches:
    """A rank's minibatches, then padding minibatches up to the agreed count; ``real``
    says whether the minibatch last yielded is the rank's own data."""

    def __init__(self, batches, total: int, padding: list) -> None:
        self.batches, self.total, self.padding = batches, total, padding
        self.real = False

    def __len__(self) -> int:
        return self.total

    def __iter__(self):
        n = 0
        for batch in self.batches:
            self.real = True
            n += 1
            yield batch
        while n < self.total:
            self.real = False
            n += 1
            yield [t.clone() for t in self.padding]


class CollectiveRoundsPlugin(SupervisedPlugin):
    def __init__(self, collective: Collective, history_length: int) -> None:
        super().__init__()
        self.collective = collective
        self.history_length = history_length

    def before_training_exp(self, strategy, **kwargs):
        local = strategy.dataloader
        total = self.collective.max_int(len(local))
        # One placeholder sample (item row 0, empty history): run, then weighted by zero.
        shape = (1, self.history_length)
        padding = [torch.zeros(shape, dtype=torch.long), torch.zeros(shape), torch.zeros(1, dtype=torch.long),
                   torch.zeros(1, dtype=torch.long)]
        strategy.dataloader = PaddedBatches(local, total, padding)

    @torch.no_grad()
    def after_backward(self, strategy, **kwargs):
        real = strategy.dataloader.real
        n_local = float(len(strategy.mbatch[0])) if real else 0.0
        sparse_names = set(getattr(strategy.model, "row_sparse_params", ()))
        named = [(n, p) for n, p in strategy.model.named_parameters() if p.requires_grad]
        has = torch.tensor([1.0 if real and p.grad is not None else 0.0 for _, p in named] + [n_local],
                           device=self.collective.device)
        dense = [(n, p) for n, p in named if n not in sparse_names]
        flat = torch.cat([(p.grad.reshape(-1) * n_local) if real and p.grad is not None
                          else torch.zeros(p.numel(), device=p.device) for _, p in dense] + [has])
        self.collective.sum_(flat)  # one all-reduce: weighted gradients, who has one, sample count
        flags, total = flat[-len(has):-1], flat[-1]
        offset = 0
        present = dict(zip((n for n, _ in named), flags.tolist()))
        for name, param in dense:
            size = param.numel()
            param.grad = flat[offset:offset + size].view_as(param).div_(total) if present[name] > 0 else None
            offset += size
        for name, param in named:
            if name not in sparse_names:
                continue
            if real and param.grad is not None:
                rows, values = gradient_rows(param.grad)
                values = values * n_local
            else:
                rows = torch.zeros(0, dtype=torch.long, device=param.device)
                values = param.new_zeros((0, *param.shape[1:]))
            rows, values = self.collective.gather_rows(rows, values)
            if present[name] <= 0:
                param.grad = None
                continue
            param.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), values.div_(total), param.shape,
                                                 check_invariants=False).coalesce()


__all__ = ["Collective", "CollectiveRoundsPlugin", "PaddedBatches"]
