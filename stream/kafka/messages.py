"""Vector records (docs/formats.md, "Vector"), shaped for the Qdrant / Milvus Kafka sinks.

Encoding runs for every published vector, so batches are normalised in one
numpy operation and orjson formats each row straight from the array (no Python
float objects in between).
"""

from __future__ import annotations

import json
import uuid
from functools import lru_cache
from typing import Optional, Sequence

import numpy as np

try:  # formatting the floats is the largest per-vector cost of publishing; orjson does it fastest
    import orjson
except ImportError:  # pragma: no cover - optional speed-up; same JSON values either way
    orjson = None

COLLECTIONS = {"user": "users", "item": "items"}
DECIMALS = 7
_SEPARATORS = (",", ":")


@lru_cache(maxsize=65536)
def entity_uuid(entity_type: str, entity_id: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{entity_type}:{entity_id}"))


def _collection(entity_type: str) -> str:
    try:
        return COLLECTIONS[entity_type]
    except KeyError:
        raise ValueError(f"entity_type must be 'user' or 'item', not {entity_type!r}") from None


def _normalised_rows(matrix: np.ndarray) -> np.ndarray:
    """L2-normalise rows in float64 (again, defensively) and round for the wire."""
    rows = np.asarray(matrix, dtype=np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", rows, rows))
    bad = ~(np.isfinite(norms) & (norms > 0))
    if bad.any():
        raise ValueError(f"cannot publish a zero or non-finite vector (row {int(np.argmax(bad))}); "
                         "a vector must have a finite, non-zero L2 norm")
    return np.round(rows / norms[:, None], DECIMALS)


def _record(entity_type: str, collection: str, entity_id: str, vector: np.ndarray,
            model_version: int, updated_at: float, extra: Optional[dict] = None) -> tuple[bytes, bytes]:
    payload = {"entity_type": entity_type, "entity_id": entity_id,
               "model_version": int(model_version), "updated_at": float(updated_at)}
    if extra:
        payload.update(extra)
    value = {
        "collection_name": collection,
        "id": entity_uuid(entity_type, entity_id),
        "vector": vector,
        "payload": payload,
    }
    if orjson is not None:
        # Same values as json.dumps; tiny floats come out as 0.0000493 rather than 4.93e-05.
        return f"{entity_type}:{entity_id}".encode(), orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)
    value["vector"] = vector.tolist()
    return f"{entity_type}:{entity_id}".encode(), json.dumps(value, separators=_SEPARATORS).encode()


def encode_vector(entity_type: str, entity_id: str, vector: np.ndarray, model_version: int,
                  updated_at: float) -> tuple[bytes, bytes]:
    """(key, value) of one vector record: key ``user:<id>`` / ``item:<id>``."""
    collection = _collection(entity_type)
    vector = np.asarray(vector)
    if vector.ndim != 1:
        raise ValueError(f"a vector must be one-dimensional, got shape {vector.shape}")
    row = _normalised_rows(vector[None, :])[0]
    return _record(entity_type, collection, entity_id, row, model_version, updated_at)


def encode_vectors(entity_type: str, entity_ids: Sequence[str], vectors: np.ndarray,
                   model_version: int, updated_at: float,
                   extras: Optional[Sequence[Optional[dict]]] = None) -> list[tuple[bytes, bytes]]:
    """Many records of one entity type; ``vectors`` has one row per id; ``extras``: optional payload
    fields per id (a user's ``because`` and ``recent_items``: ``user_extras``)."""
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.shape[0] != len(entity_ids):
        raise ValueError(f"expected {len(entity_ids)} rows of vectors, got shape {vectors.shape}")
    collection = _collection(entity_type)
    if not len(entity_ids):
        return []
    rows = _normalised_rows(vectors)
    if extras is None:
        return [_record(entity_type, collection, entity_id, row, model_version, updated_at)
                for entity_id, row in zip(entity_ids, rows)]
    return [_record(entity_type, collection, entity_id, row, model_version, updated_at, extra)
            for entity_id, row, extra in zip(entity_ids, rows, extras)]


def user_extras(because: Sequence[Sequence[tuple[str, float]]],
                recent: Sequence[Sequence[str]]) -> list[Optional[dict]]:
    """Per user, the optional payload fields of a user record (docs/formats.md): ``because``, the
    heaviest history items as (item id, weight), and ``recent_items``, the ids of the distinct items
    of the newest events, newest first (a reader leaves them out of recommendations); None when
    both are empty."""
    out: list[Optional[dict]] = []
    for heavy, newest in zip(because, recent):
        extra = {"because": [{"item_id": item, "weight": w} for item, w in heavy]} if heavy else {}
        if newest:
            extra["recent_items"] = newest
        out.append(extra or None)
    return out


def decode_vector(value: bytes) -> dict:
    """Parse a vector record value (for clients and tests)."""
    obj = json.loads(value)
    if not isinstance(obj, dict) or not {"collection_name", "id", "vector", "payload"} <= obj.keys():
        raise ValueError("not a vector record: needs collection_name, id, vector and payload")
    return obj
