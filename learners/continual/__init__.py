"""Continual learning: the Avalanche strategy and its plugins (EWC, replay, serving average, hooks, checkpoints, collective rounds, the update guard)."""
