"""The house as ARCHITECTURE.md draws it: every module on the map, and no object reading another's
private fields."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Public names that start with an underscore: namedtuple methods, and os._exit (leave without
# unwinding, from a signal handler).
_PUBLIC_UNDERSCORED = {"_replace", "_asdict", "_fields", "_make", "_exit"}


def _modules(package: str) -> list[Path]:
    skip = {"bench", "evaluation"}  # rooms the map describes as a whole
    return sorted(p for p in (ROOT / package).rglob("*.py")
                  if p.name != "__init__.py" and not skip & set(p.relative_to(ROOT / package).parts[:-1]))


def test_every_module_is_on_the_map():
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^\| `([\w/]+\.py)`", text, flags=re.M))
    missing = [str(p.relative_to(ROOT)) for package in ("stream", "learners") for p in _modules(package)
               if p.name not in listed and str(p.relative_to(ROOT / package)) not in listed]
    assert not missing, f"modules missing from ARCHITECTURE.md's tables: {missing}"


def test_no_object_reads_another_objects_private_fields():
    found = []
    for package in ("stream", "learners"):
        for path in sorted((ROOT / package).rglob("*.py")):
            lines = path.read_text().splitlines()
            for node in ast.walk(ast.parse("\n".join(lines))):
                if not (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                        and not node.attr.startswith("__") and node.attr not in _PUBLIC_UNDERSCORED):
                    continue
                owner = node.value
                if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                    continue
                if "noqa: SLF001" in lines[node.lineno - 1]:  # a reason is given on the line
                    continue
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}")
    assert not found, found
