"""The continual learner: records, model, Avalanche strategy, evaluation.

Nothing in this package knows about Kafka; the worker, ``recstream evaluate``
and ``recstream bench`` all drive the same code from here.
"""
