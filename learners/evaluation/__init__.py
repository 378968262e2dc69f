"""Offline evaluation: protocol P1 (CONTRACTS section 3) on events/items files.

``protocol`` runs any ``Recommender`` through the prequential blocks,
``popularity`` is the simplest peer, ``report`` writes the results file of
CONTRACTS section 4 with a plot and a table, ``runner.evaluate`` ties them
together, ``movielens`` converts the MovieLens CSVs into contract files.
This package never imports ``stream/``.
"""
