"""Convert a MovieLens release into contract files.

Three layouts, found by their file names:

- ``ratings.csv`` + ``movies.csv``: ml-latest(-small), ml-20m, ml-25m, ml-32m;
- ``ratings.dat`` + ``movies.dat`` (``::``-separated): ml-1m, ml-10m;
- ``u.data`` + ``u.item`` (tab- and ``|``-separated, genres as 0/1 flags): ml-100k.

Rows are streamed, so ml-25m converts in constant memory. The older releases
are Latin-1: a line that is not UTF-8 is read as Latin-1. The data sets'
licence forbids redistribution: convert into a scratch folder, never into
the repository.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

from learners.errors import RecstreamError
from learners.evaluation.files import write_events, write_items
from learners.records import Event, Item

log = logging.getLogger(__name__)

NO_GENRES = "(no genres listed)"

# ml-100k's u.item flag columns, in order (its u.genre lists the same; read when present).
ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                 "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                 "War", "Western")


class MovieLensFilesMissing(RecstreamError):
    """The folder holds none of the MovieLens layouts this converter reads."""


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


# A rating row as (user, movie, rating, timestamp) strings; a movie row as (movie, title, genres).
RatingRow = tuple[str, str, str, str]
MovieRow = tuple[str, str, str]


def _lines(path: Path) -> Iterator[str]:
    with path.open("rb") as handle:
        for raw in handle:
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                line = raw.decode("latin-1")
            line = line.rstrip("\r\n")
            if line.strip():
                yield line


def _csv_ratings(path: Path) -> Iterator[Optional[RatingRow]]:
    with path.open("r", encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            try:
                yield row["userId"], row["movieId"], row["rating"], row["timestamp"]
            except KeyError:
                yield None


def _csv_movies(path: Path) -> Iterator[Optional[MovieRow]]:
    with path.open("r", encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            try:
                yield row["movieId"], row["title"], row.get("genres") or ""
            except KeyError:
                yield None


def _split_rows(separator: str, width: int) -> Callable[[Path], Iterator[Optional[tuple]]]:
    def rows(path: Path) -> Iterator[Optional[tuple]]:
        for line in _lines(path):
            fields = line.split(separator)
            yield tuple(fields[:width]) if len(fields) >= width else None
    return rows


def _ml100k_movies(path: Path) -> Iterator[Optional[MovieRow]]:
    names = _ml100k_genre_names(path.with_name("u.genre"))
    for line in _lines(path):
        fields = line.split("|")
        flags = fields[5:]
        if len(fields) < 6 or len(flags) != len(names):
            yield None
            continue
        genres = "|".join(name for name, flag in zip(names, flags) if flag.strip() == "1" and name != "unknown")
        yield fields[0], fields[1], genres


def _ml100k_genre_names(path: Path) -> tuple[str, ...]:
    if not path.is_file():
        return ML100K_GENRES
    pairs = [line.rsplit("|", 1) for line in _lines(path)]
    try:
        return tuple(name for name, _ in sorted(pairs, key=lambda pair: int(pair[1])))
    except (ValueError, IndexError):
        return ML100K_GENRES


@dataclass(frozen=True)
class _Layout:
    release: str
    ratings: str
    movies: str
    rating_rows: Callable[[Path], Iterator[Optional[RatingRow]]]
    movie_rows: Callable[[Path], Iterator[Optional[MovieRow]]]


_LAYOUTS = (
    _Layout("ml-latest, ml-20m, ml-25m", "ratings.csv", "movies.csv", _csv_ratings, _csv_movies),
    _Layout("ml-1m, ml-10m", "ratings.dat", "movies.dat", _split_rows("::", 4), _split_rows("::", 3)),
    _Layout("ml-100k", "u.data", "u.item", _split_rows("\t", 4), _ml100k_movies),
)


def _layout(src_dir: Path) -> _Layout:
    for layout in _LAYOUTS:
        if (src_dir / layout.ratings).is_file() and (src_dir / layout.movies).is_file():
            return layout
    expected = "; ".join(f"{layout.ratings} + {layout.movies} ({layout.release})" for layout in _LAYOUTS)
    raise MovieLensFilesMissing(f"no MovieLens release in {src_dir}: expected one of {expected}. Pass the "
                                "folder the release unpacks to")


def _events(rows: Iterator[Optional[RatingRow]], skips: _Skips) -> Iterator[Event]:
    # event_id is ml-<0-based data row>, so re-conversions give the same ids.
    for row_number, row in enumerate(rows):
        try:
            user_id, item_id = row[0].strip(), row[1].strip()
            rating, ts = float(row[2]), float(row[3])
        except (TypeError, AttributeError, ValueError):
            skips.count += 1
            continue
        if not user_id or not item_id or not (math.isfinite(rating) and math.isfinite(ts)):
            skips.count += 1
            continue
        yield Event(event_id=f"ml-{row_number}", user_id=user_id, item_id=item_id,
                    event_type=rating_to_event_type(rating), ts=ts)


def _items(rows: Iterator[Optional[MovieRow]], skips: _Skips) -> Iterator[Item]:
    for row in rows:
        try:
            item = movie_item(row[0].strip(), row[1], row[2])
        except (TypeError, AttributeError):
            skips.count += 1
            continue
        if not item.item_id or not item.text:
            skips.count += 1
            continue
        yield item


def convert_movielens(src_dir: Union[str, Path], out_dir: Union[str, Path]) -> ConversionSummary:
    """Write ``out_dir/events.jsonl`` and ``out_dir/items.jsonl`` from the release in ``src_dir``.

    Events keep the ratings file's order (protocol P1 sorts by ts itself).
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    layout = _layout(src_dir)
    rating_skips, movie_skips = _Skips(), _Skips()
    events_path, items_path = out_dir / "events.jsonl", out_dir / "items.jsonl"
    n_events = write_events(events_path, _events(layout.rating_rows(src_dir / layout.ratings), rating_skips))
    n_items = write_items(items_path, _items(layout.movie_rows(src_dir / layout.movies), movie_skips))
    if rating_skips.count or movie_skips.count:
        log.warning("skipped %d malformed rating row(s) and %d movie row(s)",
                    rating_skips.count, movie_skips.count)
    return ConversionSummary(events_path, items_path, n_events, n_items,
                             rating_skips.count, movie_skips.count)
