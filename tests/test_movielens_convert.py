"""MovieLens CSV -> offline files and the rating mapping of docs/formats.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from learners.evaluation.files import read_events, read_items
from learners.evaluation.movielens import convert_movielens
from learners.records import encoder_text

REAL_DATA = Path(__file__).parents[2] / "shared/data/movielens-latest-small"


def _write_csvs(folder: Path) -> None:
    (folder / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n"
        "1,10,5.0,964982703\n"
        "1,20,4.5,964982704\n"
        "2,10,4.0,964982705\n"
        "2,30,3.5,964982706\n"
        "3,20,3.0,964982707\n"
        "3,30,0.5,964982708\n"
        "4,10,not-a-number,964982709\n"
        "4,20,4,964982710\n", encoding="utf-8")
    (folder / "movies.csv").write_text(
        "movieId,title,genres\n"
        "10,Toy Story (1995),Adventure|Animation|Children\n"
        '20,"American President, The (1995)",Comedy|Drama|Romance\n'
        "30,Some Documentary (2010),(no genres listed)\n", encoding="utf-8")


def test_converts_tiny_csv(tmp_path: Path):
    src, out = tmp_path / "ml", tmp_path / "out"
    src.mkdir()
    _write_csvs(src)
    summary = convert_movielens(src, out)
    assert (summary.events, summary.items) == (7, 3)
    assert (summary.skipped_ratings, summary.skipped_movies) == (1, 0)

    events = read_events(out / "events.jsonl")
    assert events.bad == 0
    got = [(e.event_id, e.user_id, e.item_id, e.event_type, e.ts) for e in events.records]
    assert got == [
        ("ml-0", "1", "10", "favourite", 964982703.0),  # 5
        ("ml-1", "1", "20", "favourite", 964982704.0),  # 4.5
        ("ml-2", "2", "10", "purchase", 964982705.0),   # 4
        ("ml-3", "2", "30", "purchase", 964982706.0),   # 3.5
        ("ml-4", "3", "20", "click", 964982707.0),      # 3
        ("ml-5", "3", "30", "click", 964982708.0),      # 0.5
        # row 6 (rating not a number) is skipped; ids keep the row number
        ("ml-7", "4", "20", "purchase", 964982710.0),   # integer 4
    ]

    items = read_items(out / "items.jsonl")
    assert items.bad == 0
    # Genres and year are attributes; the encoder reads them through encoder_text's template.
    assert [(i.item_id, encoder_text(i)) for i in items.records] == [
        ("10", "Toy Story (1995) | Adventure, Animation, Children | 1995"),
        ("20", "American President, The (1995) | Comedy, Drama, Romance | 1995"),
        ("30", "Some Documentary (2010) | 2010"),
    ]


def test_missing_source_is_a_clear_error(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="ratings.csv"):
        convert_movielens(tmp_path, tmp_path / "out")


@pytest.mark.skipif(not (REAL_DATA / "ratings.csv").is_file(),
                    reason="MovieLens latest-small not present in ../shared/data")
def test_converts_real_movielens_small(tmp_path: Path):
    summary = convert_movielens(REAL_DATA, tmp_path)
    assert (summary.events, summary.items) == (100836, 9742)
    events, items = read_events(summary.events_path), read_items(summary.items_path)
    assert (len(events.records), events.bad) == (100836, 0)
    assert (len(items.records), items.bad) == (9742, 0)
    assert {e.event_type for e in events.records} == {"click", "purchase", "favourite"}
