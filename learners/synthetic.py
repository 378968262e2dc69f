"""A synthetic catalogue and event stream with drifting user interests.

Used by the embedded demo, the benchmarks and tests: items have readable
texts built from a topic and attributes, and each user prefers one topic for
a while, then drifts to another, so a learner that forgets would show it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

from learners.records import Event, Item

TOPICS = ("science fiction", "romantic comedy", "crime thriller", "animated family", "war drama",
          "horror", "documentary", "fantasy adventure", "western", "musical")
_ADJECTIVES = ("quiet", "epic", "dark", "joyful", "strange", "tender", "brutal", "witty", "lost", "golden")
_NOUNS = ("river", "city", "star", "garden", "machine", "winter", "kingdom", "detective", "song", "island")


@dataclass(frozen=True)
class SyntheticWorld:
    n_items: int = 500
    n_users: int = 200
    drift_every: int = 40  # events per user before their favourite topic moves on
    seed: int = 0

    def topic_of(self, item_index: int) -> int:
        return item_index % len(TOPICS)

    def items(self) -> list[Item]:
        rng = random.Random(self.seed)
        out = []
        for i in range(self.n_items):
            topic = TOPICS[self.topic_of(i)]
            title = f"The {rng.choice(_ADJECTIVES).title()} {rng.choice(_NOUNS).title()} {i}"
            out.append(Item(f"item-{i}", f"{title} ({1960 + rng.randrange(60)}) | {topic}"))
        return out

    def events(self, n: int, start_ts: float = 1_700_000_000.0, id_prefix: str = "e") -> Iterator[Event]:
        rng = random.Random(self.seed + 1)
        n_topics = len(TOPICS)
        per_topic = [[i for i in range(self.n_items) if self.topic_of(i) == t] for t in range(n_topics)]
        seen = [0] * self.n_users
        for k in range(n):
            user = rng.randrange(self.n_users)
            topic = (user + seen[user] // self.drift_every) % n_topics
            seen[user] += 1
            pool = per_topic[topic] if rng.random() < 0.85 else range(self.n_items)
            # Within a topic a few items are much more popular than the rest.
            item = pool[min(int(rng.expovariate(1 / 8)), len(pool) - 1)] if rng.random() < 0.7 else rng.choice(pool)
            event_type = rng.choices(("click", "purchase", "favourite"), weights=(6, 3, 1))[0]
            yield Event(f"{id_prefix}-{k}", f"user-{user}", f"item-{item}", event_type, start_ts + k * 0.5)
