"""docs/configuration.md, rendered from ``Settings`` (and so from ``LearnerConfig``).

Rewrite it after changing a setting: ``python tests/config_reference.py``.
"""

from __future__ import annotations

from pathlib import Path

from learners.config import SETTING_NAMES
from stream.config import KafkaSettings, Settings

PATH = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"

_INTRO = """# Configuration

Every setting is a `recstream worker` flag and an environment variable; a
flag wins over the variable, the variable over the default. `recstream
evaluate` takes the learner's settings too, with the same names and defaults,
so it measures the learner the worker runs. This page is generated from the
code (`python tests/config_reference.py`); `recstream worker --help` says the
same.
"""


def _row(name: str) -> str:
    field = Settings.model_fields[name]
    default = "none" if field.default is None else f"`{field.default}`"
    meaning = (field.description or "").replace("|", "\\|")
    return f"| `--{name.replace('_', '-')}` | `RECSTREAM_{name.upper()}` | {default} | {meaning} |"


def render() -> str:
    kafka = list(KafkaSettings.model_fields)
    worker = [n for n in Settings.model_fields if n not in SETTING_NAMES and n not in kafka]
    parts = [_INTRO]
    for title, names in (("Kafka", kafka), ("The learner", list(SETTING_NAMES)), ("The worker", worker)):
        parts.append(f"\n## {title}\n\n| flag | variable | default | meaning |\n|---|---|---|---|\n")
        parts.append("\n".join(_row(n) for n in names) + "\n")
    return "".join(parts)


if __name__ == "__main__":  # pragma: no cover
    PATH.write_text(render(), encoding="utf-8")
    print(f"wrote {PATH}")
