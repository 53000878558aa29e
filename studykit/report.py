"""Results tables in Markdown."""

from __future__ import annotations

from typing import Any, Sequence


def format_params(count: int) -> str:
    return f"{count:,}" if count else "0 (frozen)"


def format_results_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| Method | Trainable params | Perplexity |", "|---|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['name']} ({row['method']}) | {format_params(row['trainable_params'])} | {row['perplexity']:.3f} |")
    return "\n".join(lines) + "\n"
