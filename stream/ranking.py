"""Re-ranking on the read side: maximal marginal relevance and intra-list similarity.

MMR (Carbonell and Goldstein, 1998) picks, one at a time, the candidate with
the largest ``(1 - L) * score - L * (its largest cosine to the picks so
far)``: ``L = 0`` is the ranking by score as it is, larger ``L`` trades score
for picks unlike each other. Intra-list similarity is the mean pairwise cosine
of a list: what the re-ranking lowers. Pure numpy, so the vector index, the
CLI and the offline benchmark share one definition.
"""

from __future__ import annotations

import numpy as np

# Candidates re-ranked per pick wanted: the k picks come from the best few times k by score.
POOL_PER_PICK = 5
MIN_POOL = 50


def pool_size(k: int, diversity: float) -> int:
    """How many candidates (best by score) a re-ranking of ``k`` picks looks at."""
    return k if diversity <= 0 else max(k * POOL_PER_PICK, MIN_POOL)


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (zero rows stay zero), float64."""
    vectors = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


def mmr(scores: np.ndarray, vectors: np.ndarray, k: int, diversity: float) -> list[int]:
    """Indices of ``k`` candidates in pick order. ``scores`` [n], ``vectors`` [n, dim] (cosine is taken);
    ``diversity`` L in [0, 1]. With L = 0 this is the candidates by score, best first, ties in order."""
    if not 0.0 <= diversity <= 1.0:
        raise ValueError(f"diversity must be between 0 and 1, not {diversity}")
    # Excluded candidates may come as -inf: kept finite, so L = 1 (scores weighted 0) gives no NaN.
    scores = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-1e300, posinf=1e300, neginf=-1e300)
    n = len(scores)
    k = min(k, n)
    if k <= 0:
        return []
    if diversity == 0.0:
        return np.argsort(-scores, kind="stable")[:k].tolist()
    unit = unit_rows(vectors)
    closest = np.zeros(n)  # largest cosine to a pick so far (nothing picked yet: no penalty)
    free = np.ones(n, dtype=bool)
    picks: list[int] = []
    for _ in range(k):
        value = np.where(free, (1.0 - diversity) * scores - diversity * closest, -np.inf)
        pick = int(np.argmax(value))  # first of equals: ties keep the candidates' order
        picks.append(pick)
        free[pick] = False
        similarity = unit @ unit[pick]
        closest = similarity if len(picks) == 1 else np.maximum(closest, similarity)
    return picks


def intra_list_similarity(vectors: np.ndarray) -> float:
    """Mean cosine over the pairs of a list's vectors; 0.0 for fewer than two."""
    unit = unit_rows(vectors)
    n = len(unit)
    if n < 2:
        return 0.0
    sims = unit @ unit.T
    return float((sims.sum() - np.trace(sims)) / (n * (n - 1)))
