import json
import uuid

import numpy as np
import pytest

from stream.kafka.messages import decode_vector, encode_vector, encode_vectors, entity_uuid


def test_entity_uuid_is_uuid5_of_type_and_id():
    assert entity_uuid("user", "42") == str(uuid.uuid5(uuid.NAMESPACE_URL, "user:42"))
    assert entity_uuid("item", "42") != entity_uuid("user", "42")


@pytest.mark.parametrize("entity_type,collection", [("user", "users"), ("item", "items")])
def test_encode_vector_contract_shape(entity_type, collection):
    key, value = encode_vector(entity_type, "1193", np.array([3.0, 4.0], dtype=np.float32),
                               model_version=17, updated_at=1763860000.123)
    assert key == f"{entity_type}:1193".encode()
    record = json.loads(value)
    assert record == {
        "collection_name": collection,
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{entity_type}:1193")),
        "vector": [0.6, 0.8],
        "payload": {"entity_type": entity_type, "entity_id": "1193",
                    "model_version": 17, "updated_at": 1763860000.123},
    }


def test_vector_is_l2_normalised_and_rounded():
    rng = np.random.default_rng(0)
    _, value = encode_vector("user", "u", rng.normal(size=128).astype(np.float32) * 7, 3, 1.0)
    vector = np.array(decode_vector(value)["vector"])
    assert vector.shape == (128,)
    assert abs(np.linalg.norm(vector) - 1.0) < 1e-6
    assert all(isinstance(x, float) and round(x, 7) == x for x in decode_vector(value)["vector"])


def test_model_version_is_a_plain_int():
    _, value = encode_vector("item", "i", np.ones(4), np.int64(5), 2.0)
    assert decode_vector(value)["payload"]["model_version"] == 5


def test_decode_round_trip_matches_batch_encoding():
    vectors = np.random.default_rng(1).normal(size=(3, 8))
    batch = encode_vectors("item", ["a", "b", "c"], vectors, 9, 10.0)
    singles = [encode_vector("item", i, v, 9, 10.0) for i, v in zip("abc", vectors)]
    assert batch == singles
    assert [decode_vector(v)["payload"]["entity_id"] for _, v in batch] == ["a", "b", "c"]


@pytest.mark.parametrize("bad", [np.zeros(8), np.array([np.nan, 1.0]), np.array([np.inf, 0.0])])
def test_zero_or_non_finite_vector_rejected(bad):
    with pytest.raises(ValueError, match="zero or non-finite"):
        encode_vector("user", "42", bad, 1, 1.0)


def test_unknown_entity_type_rejected():
    with pytest.raises(ValueError, match="'user' or 'item'"):
        encode_vector("shop", "1", np.ones(3), 1, 1.0)


def test_decode_rejects_non_vector_json():
    with pytest.raises(ValueError):
        decode_vector(b'{"item_id": "1"}')


def test_fast_and_plain_json_encoders_write_the_same_values(monkeypatch):
    from stream.kafka import messages

    vectors = np.random.default_rng(2).normal(size=(4, 64)) * np.array([1e-6, 1.0, 3.0, 1e3])[:, None]
    fast = encode_vectors("user", list("abcd"), vectors, 2, 5.0, [{"because": []}, None, None, None])
    monkeypatch.setattr(messages, "orjson", None)
    plain = encode_vectors("user", list("abcd"), vectors, 2, 5.0, [{"because": []}, None, None, None])
    assert [k for k, _ in fast] == [k for k, _ in plain]
    assert [json.loads(v) for _, v in fast] == [json.loads(v) for _, v in plain]
