"""The serving average: a lagging copy of the tower's weights that vectors are published from."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from learners.continual.serving_average import ServingAverage


class Tower(nn.Module):
    def __init__(self, rows: int) -> None:
        super().__init__()
        self.item_emb = nn.Parameter(torch.zeros(rows, 2))
        self.bias = nn.Parameter(torch.zeros(2))
        self.user_proj = nn.Linear(2, 2)
        self.top = nn.Linear(2, 2)  # the encoder's trainable top: never averaged


def test_shadow_moves_toward_the_live_weights_by_one_minus_decay_per_step():
    tower = Tower(3)
    average = ServingAverage(tower, decay=0.5)
    average.after_training_iteration(None)  # first step: the shadow starts at the live weights
    with torch.no_grad():
        tower.item_emb.fill_(8.0)
        tower.bias.fill_(-4.0)
    average.after_training_iteration(None)
    average.after_training_iteration(None)
    assert torch.allclose(average.shadow["item_emb"], torch.full((3, 2), 6.0))  # 0 -> 4 -> 6
    assert torch.allclose(average.shadow["bias"], torch.full((2,), -3.0))
    assert not any(name.startswith("top.") for name in average.shadow)


def test_applied_serves_the_average_and_restores_the_live_weights():
    tower = Tower(2)
    average = ServingAverage(tower, decay=0.9)
    average.after_training_iteration(None)
    with torch.no_grad():
        tower.item_emb.fill_(1.0)
    with average.applied():
        assert torch.equal(tower.item_emb.detach(), torch.zeros(2, 2))
    assert torch.equal(tower.item_emb.detach(), torch.ones(2, 2))


def test_rows_added_by_a_growing_table_start_at_their_live_value():
    tower = Tower(2)
    average = ServingAverage(tower, decay=0.9)
    average.after_training_iteration(None)
    tower.item_emb = nn.Parameter(torch.cat([tower.item_emb.detach(), torch.full((2, 2), 5.0)]))
    average.after_training_iteration(None)
    assert torch.equal(average.shadow["item_emb"][2:], torch.full((2, 2), 5.0))
    state = average.state()
    restored = ServingAverage(tower, decay=0.9)
    restored.load_state(state, torch.device("cpu"))
    assert torch.equal(restored.shadow["item_emb"], average.shadow["item_emb"])


def test_decay_must_lie_in_zero_one():
    with pytest.raises(ValueError):
        ServingAverage(Tower(1), decay=1.0)


def test_names_limit_what_is_averaged_and_served():
    tower = Tower(2)
    average = ServingAverage(tower, decay=0.9, names=("item_emb", "bias"))
    average.after_training_iteration(None)
    assert set(average.shadow) == {"item_emb", "bias"}
    with torch.no_grad():
        tower.item_emb.fill_(1.0)
        tower.user_proj.weight.fill_(2.0)
    with average.applied():
        assert torch.equal(tower.item_emb.detach(), torch.zeros(2, 2))  # served from the average
        assert torch.equal(tower.user_proj.weight.detach(), torch.full((2, 2), 2.0))  # live
    everything = ServingAverage(tower, decay=0.9)
    everything.after_training_iteration(None)
    restored = ServingAverage(tower, decay=0.9, names=("item_emb",))
    restored.load_state(everything.state(), torch.device("cpu"))  # a checkpoint that averaged more
    assert set(restored.shadow) == {"item_emb"}



def test_the_published_share_follows_what_ranked_the_newest_events_best_and_survives_a_restore():
    tower = Tower(3)
    average = ServingAverage(tower, decay=0.5)
    average.after_training_iteration(None)
    with torch.no_grad():
        tower.item_emb.fill_(8.0)
    assert average.share == 1.0  # the average until the stream says otherwise
    with average.applied(0.5):
        assert torch.allclose(tower.item_emb, torch.full((3, 2), 4.0))  # halfway from live to average
    assert torch.allclose(tower.item_emb, torch.full((3, 2), 8.0))
    assert average.choose([0.3, 0.2, 0.1]) == 0.0  # the live weights ranked the newest events best
    for _ in range(5):
        average.choose([0.0, 0.1, 0.4])
    assert average.share == 1.0  # tastes held again: the smoothing pays
    restored = ServingAverage(Tower(3), decay=0.5)
    restored.load_state(average.state(), torch.device("cpu"))
    assert restored.share == average.share and list(restored.evidence) == list(average.evidence)
