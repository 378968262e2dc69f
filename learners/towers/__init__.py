"""The two-tower model: item and user towers, the sampled-softmax loss and its negatives, the optimizer, LoRA adapters."""
