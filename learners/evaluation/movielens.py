"""Convert MovieLens CSVs (ratings.csv, movies.csv) into contract files.

Rows are streamed with the csv module, so ml-25m converts in constant memory.
The data set's licence forbids redistribution: convert into a scratch folder,
never into the repository.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

from learners.evaluation.files import write_events, write_items
from learners.records import Event, Item

log = logging.getLogger(__name__)

NO_GENRES = "(no genres listed)"


@dataclass(frozen=True)
class ConversionSummary:
    events_path: Path
    items_path: Path
    events: int
    items: int
    skipped_ratings: int
    skipped_movies: int


def rating_to_event_type(rating: float) -> str:
    """docs/formats.md, offline files: >= 4.5 favourite, 3.5..4.5 purchase, below click."""
    if rating >= 4.5:
        return "favourite"
    if rating >= 3.5:
        return "purchase"
    return "click"


_YEAR = re.compile(r"^(.*\S)\s*\((\d{4})\)\s*$")


def movie_item(item_id: str, title: str, genres: str) -> Item:
    """An item whose text is the title and whose attributes are the genres and the year (from a
    title ending in ``(YYYY)``, which the title keeps); the placeholder for no genres is dropped."""
    names = [g.strip() for g in genres.split("|") if g.strip() and g.strip() != NO_GENRES]
    title = title.strip()
    attributes = []
    if names:
        attributes.append(("genres", tuple(names)))
    match = _YEAR.match(title)
    if match:  # the title keeps its year too: that is how the text model has seen film titles
        attributes.append(("year", int(match.group(2))))
    return Item(item_id=item_id, text=title, attributes=tuple(attributes))


class _Skips:
    def __init__(self) -> None:
        self.count = 0


def _csv_rows(path: Path) -> Iterator[dict]:
    with path.open("r", encoding="utf-8", newline="") as handle:
        yield from csv.DictReader(handle)


def _events(path: Path, skips: _Skips) -> Iterator[Event]:
    # event_id is ml-<0-based data row>, so re-conversions give the same ids.
    for row_number, row in enumerate(_csv_rows(path)):
        try:
            user_id, item_id = row["userId"].strip(), row["movieId"].strip()
            rating, ts = float(row["rating"]), float(row["timestamp"])
        except (KeyError, TypeError, AttributeError, ValueError):
            skips.count += 1
            continue
        if not user_id or not item_id or not (math.isfinite(rating) and math.isfinite(ts)):
            skips.count += 1
            continue
        yield Event(event_id=f"ml-{row_number}", user_id=user_id, item_id=item_id,
                    event_type=rating_to_event_type(rating), ts=ts)


def _items(path: Path, skips: _Skips) -> Iterator[Item]:
    for row in _csv_rows(path):
        try:
            item = movie_item(row["movieId"].strip(), row["title"], row.get("genres") or "")
        except (KeyError, AttributeError):
            skips.count += 1
            continue
        if not item.item_id or not item.text:
            skips.count += 1
            continue
        yield item


def convert_movielens(src_dir: Union[str, Path], out_dir: Union[str, Path]) -> ConversionSummary:
    """Write ``out_dir/events.jsonl`` and ``out_dir/items.jsonl`` from ``src_dir``.

    Events keep the ratings.csv order (protocol P1 sorts by ts itself).
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    ratings, movies = src_dir / "ratings.csv", src_dir / "movies.csv"
    for needed in (ratings, movies):
        if not needed.is_file():
            raise FileNotFoundError(f"MovieLens file not found: {needed}")
    rating_skips, movie_skips = _Skips(), _Skips()
    events_path, items_path = out_dir / "events.jsonl", out_dir / "items.jsonl"
    n_events = write_events(events_path, _events(ratings, rating_skips))
    n_items = write_items(items_path, _items(movies, movie_skips))
    if rating_skips.count or movie_skips.count:
        log.warning("skipped %d malformed rating row(s) and %d movie row(s)",
                    rating_skips.count, movie_skips.count)
    return ConversionSummary(events_path, items_path, n_events, n_items,
                             rating_skips.count, movie_skips.count)
