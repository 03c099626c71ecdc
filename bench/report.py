"""Medians, the one results table, and the JSON document.

Every figure is a median over rounds. Ratios are ``median(target) /
median(direct)``. Added latency is the median over rounds of ``target - direct``
within the same round (the two ran minutes apart at most, so the pairing removes
slow drift). CPU per 10,000 transactions comes first: it depends far less on
where the scheduler puts the load generator than throughput does.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

#: remote: the CLI's forwarder and the tunnel in front of the gateway (issue 13)
TARGETS = ("direct", "gateway", "remote", "pgbouncer")


@dataclass(frozen=True)
class Figure:
    """One row of the table: which metric of which workload, and how to print it."""

    section: str
    label: str
    workload: str
    metric: str
    fmt: str
    #: a difference to direct in the same round instead of the value itself
    added: bool = False
    #: whether target/direct ratios mean anything for this row
    ratios: bool = True


def median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def medians(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """workload -> target -> metric -> median over the rounds that succeeded."""
    grouped: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for record in results:
        if "error" in record:
            continue
        grouped.setdefault(record["workload"], {}).setdefault(record["target"], []).append(
            record["metrics"]
        )
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for workload, by_target in grouped.items():
        for target, runs in by_target.items():
            keys = {k for run in runs for k, v in run.items() if isinstance(v, int | float)}
            out.setdefault(workload, {})[target] = {
                k: median(run.get(k) for run in runs) for k in sorted(keys)
            }
    return out


def added_to_direct(
    results: Sequence[dict[str, Any]], workload: str, metric: str
) -> dict[str, float | None]:
    """target -> median over rounds of (target - direct) for one metric."""
    by_round: dict[int, dict[str, float]] = {}
    for record in results:
        if record["workload"] == workload and "error" not in record:
            by_round.setdefault(record["round"], {})[record["target"]] = record["metrics"][metric]
    out: dict[str, float | None] = {}
    for target in TARGETS:
        diffs = [
            values[target] - values["direct"]
            for values in by_round.values()
            if target in values and "direct" in values
        ]
        out[target] = statistics.median(diffs) if diffs else None
    return out


def rows(
    figures: Sequence[Figure],
    results: Sequence[dict[str, Any]],
    targets: Sequence[str],
) -> list[dict[str, Any]]:
    table = medians(results)
    out: list[dict[str, Any]] = []
    for figure in figures:
        if figure.workload not in table:
            continue
        if figure.added:
            values = added_to_direct(results, figure.workload, figure.metric)
            values["direct"] = None
        else:
            values = {t: table[figure.workload].get(t, {}).get(figure.metric) for t in TARGETS}
        if all(values.get(t) is None for t in targets):
            continue
        row: dict[str, Any] = {
            "section": figure.section,
            "figure": figure.label,
            "workload": figure.workload,
            "metric": figure.metric,
            "fmt": figure.fmt,
            **{t: values.get(t) if t in targets else None for t in TARGETS},
        }
        direct = values.get("direct")
        for t in TARGETS[1:]:
            value = values.get(t)
            ratio = None
            if figure.ratios and not figure.added and direct and value is not None:
                ratio = value / direct
            row[f"{t}/direct"] = ratio
        out.append(row)
    return out


def _cell(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def render(
    table_rows: Sequence[dict[str, Any]], targets: Sequence[str], title: str, console: Console
) -> None:
    table = Table(title=title, title_justify="left", show_lines=False)
    table.add_column("figure (median)")
    for t in targets:
        table.add_column(t, justify="right")
    for t in targets:
        if t != "direct":
            table.add_column(f"{t}/direct", justify="right")
    section = None
    for row in table_rows:
        if row["section"] != section:
            if section is not None:
                table.add_section()
            section = row["section"]
        cells = [row["figure"], *(_cell(row[t], row["fmt"]) for t in targets)]
        cells += [_cell(row[f"{t}/direct"], ".2f") for t in targets if t != "direct"]
        table.add_row(*cells)
    console.print(table)


def markdown(table_rows: Sequence[dict[str, Any]], targets: Sequence[str]) -> str:
    """The same table as GitHub Markdown, for docs/performance.md."""
    ratio_targets = [t for t in targets if t != "direct"]
    header = ["figure (median)", *targets, *(f"{t}/direct" for t in ratio_targets)]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for row in table_rows:
        cells = [row["figure"], *(_cell(row[t], row["fmt"]) for t in targets)]
        cells += [_cell(row[f"{t}/direct"], ".2f") for t in ratio_targets]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
