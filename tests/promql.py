"""PromQL expressions of the dashboard and the alert rules, ready to evaluate.

A test that runs a real Prometheus against a running worker evaluates every
expression returned here (``/api/v1/query``): it proves the panels and alerts
refer to series that exist. Grafana's built-in variables are replaced by
fixed values so the expressions are plain PromQL.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator, Union

import yaml

# Grafana built-in variables -> the value used when evaluating outside Grafana
GRAFANA_BUILTINS = {
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "1m",
    "__interval_ms": "60000",
    "__range_ms": "60000",
    "__range_s": "60",
}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")

PathLike = Union[str, Path]


def _panels(panels: list) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # panels inside (collapsed) rows


def _template_values(dashboard: dict) -> dict[str, str]:
    values = {}
    for var in dashboard.get("templating", {}).get("list", []):
        current = (var.get("current") or {}).get("value")
        if isinstance(current, list):
            current = "|".join(current)
        if current is not None:
            values[var["name"]] = "" if current == "$__all" else str(current)
    return values


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace ``$var``, ``${var}``, ``${var:fmt}`` and ``[[var]]``; unknown names stay as they are."""
    def repl(match: re.Match) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        return values.get(name, match.group(0))
    return _VARIABLE.sub(repl, expr)


def dashboard_panel_expressions(path: PathLike) -> list[tuple[str, str]]:
    """(panel title, expression) for every Prometheus target of a Grafana dashboard JSON."""
    dashboard = json.loads(Path(path).read_text(encoding="utf-8"))
    values = {**GRAFANA_BUILTINS, **_template_values(dashboard)}
    out = []
    for panel in _panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            expr = target.get("expr")
            if expr and not target.get("hide"):
                out.append((panel.get("title", ""), substitute(expr, values)))
    return out


def dashboard_expressions(path: PathLike) -> list[str]:
    """Every Prometheus target expression of a Grafana dashboard, variables substituted."""
    return [expr for _, expr in dashboard_panel_expressions(path)]


def alert_rules(path: PathLike) -> list[dict]:
    """Every rule (alerting and recording) of a Prometheus rules file."""
    document = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    return [rule for group in document.get("groups", []) for rule in group.get("rules", [])]


def alert_expressions(path: PathLike) -> list[str]:
    """The ``expr`` of every rule of a Prometheus rules file, whitespace trimmed."""
    return [str(rule["expr"]).strip() for rule in alert_rules(path)]
