"""Markdown tables: the one builder every report uses (data report, evaluation, gate, ablation, UI)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

Align = Literal["left", "right"]


def cell(value: Any) -> str:
    """A value as a table cell: None as ``-``, floats to 4 decimals, pipes escaped, one line."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(
    header: Sequence[str], rows: Iterable[Sequence[Any]], align: Sequence[Align] | None = None
) -> list[str]:
    """The lines of a Markdown table; ``align`` per column (default left), cells through ``cell``.

    Pass cells already formatted as strings to control number formats (``f"{x:+.4f}"``).
    """
    aligns = list(align) if align is not None else ["left"] * len(header)
    if len(aligns) != len(header):
        raise ValueError(f"{len(header)} columns but {len(aligns)} alignments")
    rule = "|" + "|".join("---:" if a == "right" else "---" for a in aligns) + "|"
    lines = ["| " + " | ".join(header) + " |", rule]
    for row in rows:
        lines.append("| " + " | ".join(cell(value) for value in row) + " |")
    return lines
