"""MovieLens releases (three layouts) -> offline files, and the rating mapping of docs/formats.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from learners.evaluation.files import read_events, read_items
from learners.evaluation.movielens import MovieLensFilesMissing, convert_movielens
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
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n")  # movies.csv missing
    with pytest.raises(MovieLensFilesMissing, match="ratings.csv [+] movies.csv .*u.data [+] u.item [(]ml-100k[)]"):
        convert_movielens(tmp_path, tmp_path / "out")


def _converted(src: Path, out: Path):
    summary = convert_movielens(src, out)
    events, items = read_events(out / "events.jsonl"), read_items(out / "items.jsonl")
    assert events.bad == 0 and items.bad == 0
    return (summary, [(e.event_id, e.user_id, e.item_id, e.event_type, e.ts) for e in events.records],
            [(i.item_id, encoder_text(i)) for i in items.records])


def test_converts_the_dat_layout_of_ml_1m(tmp_path: Path):
    (tmp_path / "ratings.dat").write_bytes(b"1::1193::5::978300760\n1::661::3::978302109\n2::1193::x::978300761\n")
    (tmp_path / "movies.dat").write_bytes(
        b"1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
        b"661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
        b"3::Caf\xe9 au lait (1993)::Comedy\n")  # Latin-1, as the release is
    summary, events, items = _converted(tmp_path, tmp_path / "out")
    assert (summary.events, summary.items, summary.skipped_ratings) == (2, 3, 1)
    assert events == [("ml-0", "1", "1193", "favourite", 978300760.0), ("ml-1", "1", "661", "click", 978302109.0)]
    assert items[1] == ("661", "James and the Giant Peach (1996) | Animation, Children's, Musical | 1996")
    assert items[2] == ("3", "Café au lait (1993) | Comedy | 1993")


def test_converts_the_layout_of_ml_100k_with_genre_flags(tmp_path: Path):
    (tmp_path / "u.data").write_text("196\t242\t3\t881250949\n186\t302\t4\t891717742\n")
    flags = ["0"] * 19
    comedy = flags.copy(); comedy[5] = "1"
    crime_thriller = flags.copy(); crime_thriller[6] = crime_thriller[16] = "1"
    unknown = flags.copy(); unknown[0] = "1"
    (tmp_path / "u.item").write_bytes("\n".join([
        "|".join(["242", "Kolya (1996)", "24-Jan-1997", "", "http://x"] + comedy),
        "|".join(["302", "L.A. Confidential (1997)", "01-Jan-1997", "", "http://y"] + crime_thriller),
        "|".join(["267", "unknown", "", "", ""] + unknown),
        "|".join(["9", "too few columns"]),
    ]).encode("latin-1") + b"\n")
    summary, events, items = _converted(tmp_path, tmp_path / "out")
    assert (summary.events, summary.items, summary.skipped_movies) == (2, 3, 1)
    assert events == [("ml-0", "196", "242", "click", 881250949.0), ("ml-1", "186", "302", "purchase", 891717742.0)]
    assert items == [("242", "Kolya (1996) | Comedy | 1996"),
                     ("302", "L.A. Confidential (1997) | Crime, Thriller | 1997"),
                     ("267", "unknown")]  # the "unknown" genre flag is no genre


@pytest.mark.skipif(not (REAL_DATA / "ratings.csv").is_file(),
                    reason="MovieLens latest-small not present in ../shared/data")
def test_converts_real_movielens_small(tmp_path: Path):
    summary = convert_movielens(REAL_DATA, tmp_path)
    assert (summary.events, summary.items) == (100836, 9742)
    events, items = read_events(summary.events_path), read_items(summary.items_path)
    assert (len(events.records), events.bad) == (100836, 0)
    assert (len(items.records), items.bad) == (9742, 0)
    assert {e.event_type for e in events.records} == {"click", "purchase", "favourite"}
