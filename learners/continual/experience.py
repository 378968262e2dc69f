"""Turn events into training samples and Avalanche experiences, and experiences back into tensors.

A sample is what the model saw when the event happened: the user's history
before it (item rows and weights, fixed length) and the item they went to.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch.utils.data import TensorDataset
from avalanche.benchmarks.scenarios.dataset_scenario import DatasetExperience
from avalanche.benchmarks.utils import DataAttribute, make_avalanche_dataset

OWNERS = "owners"


def make_experience(hist_rows: np.ndarray, hist_weights: np.ndarray, item_rows: np.ndarray,
                    index: int, owners: Optional[np.ndarray] = None) -> DatasetExperience:
    """``owners``: each sample's ``learners.state.users.owner_tag`` (kept by the replay reservoir so a
    user's samples can be erased); not part of a minibatch."""
    rows = torch.from_numpy(np.ascontiguousarray(hist_rows, dtype=np.int64))
    weights = torch.from_numpy(np.ascontiguousarray(hist_weights, dtype=np.float32))
    items = torch.from_numpy(np.ascontiguousarray(item_rows, dtype=np.int64))
    n = len(items)
    attributes = [
        DataAttribute(items.tolist(), "targets"),
        DataAttribute([0] * n, "targets_task_labels", use_in_getitem=True),
    ]
    if owners is not None:
        attributes.append(DataAttribute(np.asarray(owners, np.int64).tolist(), OWNERS))
    dataset = make_avalanche_dataset(TensorDataset(rows, weights, items), data_attributes=attributes)
    return DatasetExperience(dataset=dataset, current_experience=index)


def dataset_owners(dataset) -> Optional[torch.Tensor]:
    """The owner tags of an experience dataset's samples, in dataset order (None: not tagged)."""
    try:
        owners = getattr(dataset, OWNERS)
    except (AttributeError, KeyError):
        return None
    return torch.as_tensor(list(owners), dtype=torch.long)


def dataset_tensors(dataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(history rows, history weights, item rows) of an experience dataset, in dataset order."""
    if len(dataset) == 0:  # a rank with nothing pending in a collective round
        return torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    flat = getattr(dataset, "_flat_data", None)
    leaves = getattr(flat, "_datasets", None)
    if leaves and all(isinstance(d, torch.utils.data.TensorDataset) and len(d.tensors) >= 3 for d in leaves):
        try:
            indices = torch.as_tensor(list(flat._get_lazy_indices()), dtype=torch.long)  # noqa: SLF001 - guarded
            return tuple(torch.cat([d.tensors[k] for d in leaves])[indices] for k in range(3))  # type: ignore
        except Exception:  # noqa: BLE001 - Avalanche internals changed: the public path below
            pass
    samples = [dataset[i] for i in range(len(dataset))]
    return tuple(torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in range(3))  # type: ignore
