"""Markdown tables with one row per label and one column per sparsity ratio."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any


def labels_in_order(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The distinct ``label`` values of ``rows``, in first-seen order."""
    return list(dict.fromkeys(r["label"] for r in rows))


def ratio_header(head: str, ratios: Sequence[float], right: bool = True) -> list[str]:
    """The header and rule lines; ``right``: numeric columns right-aligned (``---:``)."""
    rule = "| --- |" + " ---: |" * len(ratios) if right else "|---" * (len(ratios) + 1) + "|"
    return [f"| {head} | " + " | ".join(f"{r:g}" for r in ratios) + " |", rule]


def ratio_table(
    head: str,
    labels: Sequence[str],
    ratios: Sequence[float],
    cell: Callable[[str, float], str],
    right: bool = True,
) -> str:
    """One row per label, one column per ratio, cells from ``cell(label, ratio)``."""
    lines = ratio_header(head, ratios, right)
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(cell(label, r) for r in ratios) + " |")
    return "\n".join(lines)
