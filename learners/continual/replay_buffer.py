"""The replay reservoir: a uniform sample of every training sample seen, in preallocated tensors.

Algorithm R, vectorised over an experience: sample number n (counted from 0
over the whole stream) takes slot n while the reservoir fills, then slot
j ~ uniform(0..n) when j < capacity. An update writes only the slots it
draws, so it costs O(experience) whatever the capacity (Avalanche's
``ReservoirSamplingBuffer`` rebuilds a dataset of the whole buffer each
time), and memory is the three tensors allocated at the first update.

The randomness comes from a generator seeded with (``seed``, samples seen
so far): the state is the tensors plus one count, and a restored reservoir
continues exactly as an uninterrupted one would.

Beside each sample the reservoir keeps its owner tag (``learners.state.users.owner_tag``,
0 when unknown), so that erasing a user removes their samples (``remove_owner``).
"""

from __future__ import annotations

from typing import Optional

import torch
from avalanche.training.storage_policy import ExemplarsBuffer

from learners.continual.experience import dataset_owners, dataset_tensors, make_experience

SEED = 0x5EED
# History rows are catalogue rows (far below 2^31): int32 keeps a third less memory and
# checkpoint bytes (100k x 64: 26 MB less); the replay plugin widens the few it draws.
ROW_DTYPE = torch.int32


class TensorReservoir(ExemplarsBuffer):
    """Avalanche storage policy holding (history rows, history weights, item rows) tensors."""

    def __init__(self, max_size: int, seed: int = SEED) -> None:
        super().__init__(max_size)
        self.seed = seed
        self.seen_samples = 0
        self.filled = 0
        self._store: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
        self._owners: Optional[torch.Tensor] = None  # [capacity] int64, beside _store
        self._dataset = None

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views (no copy) of the kept samples: rows [n, L] int32, weights [n, L], items [n]."""
        if self._store is None:
            return torch.zeros(0, 0, dtype=ROW_DTYPE), torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
        return tuple(t[:self.filled] for t in self._store)  # type: ignore[return-value]

    def owners(self) -> torch.Tensor:
        """The owner tag of each kept sample (a view), in the order of ``tensors()``."""
        if self._owners is None:
            return torch.zeros(0, dtype=torch.long)
        return self._owners[:self.filled]

    def remove_owner(self, tag: int) -> int:
        """Remove every kept sample of this owner (a user's erasure); returns how many.

        The others move up, keeping their order; the freed slots fill first with the next
        samples, and the count seen stays, so sampling goes on uniformly over the rest."""
        if self._store is None or not self.filled:
            return 0
        keep = torch.nonzero(self._owners[:self.filled] != tag).squeeze(1)
        removed = self.filled - len(keep)
        if removed:
            for store in (*self._store, self._owners):
                kept = store[keep].clone()
                store[:len(keep)] = kept
                store[len(keep):self.filled] = 0
            self.filled = len(keep)
            self._dataset = None
        return removed

    @property
    def buffer(self):
        """The kept samples as an Avalanche dataset (a copy, built on demand; for checks, not the hot path)."""
        if self.filled == 0:
            return self._buffer  # Avalanche's empty dataset
        if self._dataset is None:
            rows, weights, items = (t.clone().numpy() for t in self.tensors())
            self._dataset = make_experience(rows, weights, items, 0).dataset
        return self._dataset

    def post_adapt(self, agent_state, exp) -> None:
        self.update_from_dataset(exp.dataset)

    def update_from_dataset(self, dataset) -> None:
        self.add(*dataset_tensors(dataset), owners=dataset_owners(dataset))

    def add(self, rows: torch.Tensor, weights: torch.Tensor, items: torch.Tensor,
            owners: Optional[torch.Tensor] = None) -> None:
        k, cap, seen = len(items), int(self.max_size), self.seen_samples
        if k == 0 or cap <= 0:
            self.seen_samples += k
            return
        self._allocate(rows.shape[1])
        # Only the low 32 bits of a CPU generator's seed count: distinct streams for 2^32 samples.
        gen = torch.Generator().manual_seed((self.seed + seen) % 2**32)
        n = torch.arange(seen, seen + k)
        draws = (torch.rand(k, generator=gen, dtype=torch.float64) * (n + 1)).long().clamp_(max=n)
        # Free slots fill in order (filled < seen only after a restore or resize); then Algorithm R.
        append = self.filled + torch.arange(k)
        slots = torch.where(append < cap, append, draws)
        src = torch.nonzero(slots < cap).squeeze(1)
        slots = slots[src]
        # Two samples drawing one slot: the later wins, as in sequential Algorithm R.
        # (An index_put with repeated indices leaves the winner unspecified.)
        order = torch.argsort(slots, stable=True)
        slots, src = slots[order], src[order]
        last = torch.ones(len(slots), dtype=torch.bool)
        last[:-1] = slots[1:] != slots[:-1]
        slots, src = slots[last], src[last]
        for store, new in zip(self._store, (rows, weights, items)):
            store[slots] = new[src].to(store.dtype)
        self._owners[slots] = owners[src].to(torch.long) if owners is not None else 0
        self.filled = min(cap, self.filled + k)
        self.seen_samples = seen + k
        self._dataset = None

    def load(self, rows: torch.Tensor, weights: torch.Tensor, items: torch.Tensor,
             seen: Optional[int] = None, owners: Optional[torch.Tensor] = None) -> None:
        """Replace the contents with saved samples (the first ``max_size`` of them) and the count seen.

        ``seen`` unknown (an older checkpoint): the saved samples are taken as all there was.
        ``owners`` unknown (an older checkpoint): tagged 0, which no erasure matches.
        """
        keep = min(len(items), int(self.max_size))
        self._store, self._owners, self.filled, self._dataset = None, None, 0, None
        if keep:
            self._allocate(rows.shape[1])
            for store, saved in zip(self._store, (rows, weights, items)):
                store[:keep] = saved[:keep]
            if owners is not None and len(owners) >= keep:
                self._owners[:keep] = owners[:keep]
        self.filled = keep
        self.seen_samples = max(int(seen or 0), len(items))

    def resize(self, strategy, new_size: int) -> None:
        kept = tuple(t.clone() for t in self.tensors())
        owners = self.owners().clone()
        self.max_size = new_size
        self.load(*kept, self.seen_samples, owners=owners)

    def _allocate(self, length: int) -> None:
        if self._store is None:  # zero-filled now: memory is flat from the first update, not growing
            cap = int(self.max_size)
            self._store = (torch.zeros(cap, length, dtype=ROW_DTYPE), torch.zeros(cap, length),
                           torch.zeros(cap, dtype=torch.long))
            self._owners = torch.zeros(cap, dtype=torch.long)
        elif self._store[0].shape[1] != length:
            raise ValueError(f"history length {length} differs from the reservoir's {self._store[0].shape[1]}")
