"""Structured item attributes: validated into the record, read by the encoder through one template."""

import json

import pytest

from learners.records import BadRecord, Item, encoder_text, item_to_json, parse_item


def _item(**fields) -> bytes:
    return json.dumps({"item_id": "i1", "text": "Heat", **fields}).encode()


def test_attributes_are_kept_sorted_and_rendered_by_the_template():
    item = parse_item(_item(attributes={"year": 1995, "genres": ["Action", "Crime"], "price": 9.5,
                                        "brand": "Warner", "in_stock": True}))
    assert isinstance(item, Item)
    assert [k for k, _ in item.attributes] == ["brand", "genres", "in_stock", "price", "year"]
    assert encoder_text(item) == "Heat | Warner | Action, Crime | true | 9.5 | 1995"
    assert parse_item(item_to_json(item)) == item  # the record round-trips


def test_an_item_without_attributes_reads_as_its_text():
    item = parse_item(_item())
    assert item.attributes == () and encoder_text(item) == "Heat"
    assert parse_item(_item(attributes=None)) == item


@pytest.mark.parametrize("attributes,detail", [
    ([1, 2], "JSON object"),
    ({"genres": {"a": 1}}, "'genres'"),
    ({"tags": ["ok", 3]}, "'tags'"),
    ({"tags": [["nested"]]}, "'tags'"),
    ({"x": "y" * 257}, "'x'"),
    ({"k" * 65: 1}, "names"),
    ({"": 1}, "names"),
    ({f"k{i}": i for i in range(33)}, "more than"),
    ({"bad": "\ud800"}, "'bad'"),
])
def test_bad_attributes_are_a_dead_letter_with_a_reason(attributes, detail):
    raw = json.dumps({"item_id": "i1", "text": "Heat", "attributes": attributes}).encode()
    bad = parse_item(raw)
    assert isinstance(bad, BadRecord) and bad.reason == "bad_attributes" and detail in bad.detail


def test_changed_attributes_re_embed_the_item(tmp_path):
    from learners.learner import ContinualRecommender, LearnerConfig
    from stream.config import default_model_path

    learner = ContinualRecommender(LearnerConfig(model_path=default_model_path(), device="cpu", vector_dim=16,
                                                 negatives=8))
    first = parse_item(_item(attributes={"genres": ["Action"]}))
    assert learner.add_items([first]) == ["i1"]
    assert learner.add_items([first]) == []  # unchanged: not encoded again
    assert learner.add_items([parse_item(_item(attributes={"genres": ["Comedy"]}))]) == ["i1"]
