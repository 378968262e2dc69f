"""Offline evaluation: protocol P1 and P1-cold (docs/formats.md) on events/items files.

``protocol`` runs any ``Recommender`` through the prequential blocks,
``popularity`` is the simplest peer, ``report`` writes the results file
(docs/formats.md) with a plot and a table, ``runner.evaluate`` ties them
together, ``movielens`` converts the MovieLens CSVs into offline files.
This package never imports ``stream/``.
"""
