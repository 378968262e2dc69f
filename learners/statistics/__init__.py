"""What the learner counts beside its weights: popularity, the trending value, item evidence, the item-item head."""
