"""The analysis in words and tables: the verdict paragraph at the top of results.md, and analysis.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from studykit.io import atomic_write_text
from studykit.verdict import VERDICT_CONFIDENCE, Verdict, sentence

ANALYSIS_START = "<!-- analysis:start -->"
ANALYSIS_END = "<!-- analysis:end -->"

FIGURE_SENTENCES = {
    "gap_by_bucket": "How to read it: each bar is one bucket's share of the run's test-NLL gap to full FT in nats per "
    "test token (bars of a panel add up to the gap; whiskers: 95% over seeds and trees); a tall bar is where LoRA "
    "falls short.",
    "spectra": "How to read it: singular values of the weight change dW (mean over layers, log-log); a LoRA curve "
    "stops at its rank, and the share of full FT's curve beyond that rank is what LoRA cannot hold.",
    "rank_map": "How to read it: colour is the effective rank of dW per layer and module, the number in a cell the "
    "intruder dimensions of the trained weight (mean over seeds); LoRA's intruders with few in full FT's map are "
    "the paper's signature.",
    "mitigation": "How to read it: each LoRA training's test perplexity against its forgetting as its intruder "
    "directions are scaled by lambda (1: as trained), full FT as a star; moving left without moving up means the "
    "forgetting sat in the intruders.",
}


def verdict_paragraph(analysis: dict[str, Any]) -> str:
    """Per run, its answer; what the interval covers and leaves out; the largest bucket; the module kind that needs
    the most rank."""
    verdicts = [
        Verdict(**{**v, "interval_90": tuple(v["interval_90"]) if v["interval_90"] else None})
        for v in analysis["verdict"].values()
    ]
    if not verdicts:
        return ""
    margin = verdicts[0].margin
    parts = [
        f"**Verdict** (margin {margin:.0%} in perplexity, fixed in the study file before any result; two one-sided "
        f"tests on the {VERDICT_CONFIDENCE:.0%} interval of the seed-paired perplexity ratio to "
        f"{analysis['reference_run']}):"
    ]
    parts += [sentence(verdict) for verdict in verdicts]
    parts.append(
        f"The interval covers {verdicts[0].covers}; nor does it cover other data or budgets: the answer "
        "is about this setup."
    )
    for run, largest in analysis["largest_bucket"].items():
        gap = analysis["gap_by_bucket"][run]
        row = largest["bucket"]
        share = row["gap_contribution"] / gap["total_gap"] if gap["total_gap"] else 0.0
        parts.append(
            f"The largest part of {run}'s gap ({gap['total_gap']:+.4f} nats per token) is in "
            f"{largest['family'].replace('_', ' ')} bucket '{row['bucket']}': {share:.0%} of the gap from "
            f"{row['token_share']:.0%} of the tokens" + concentrated_clause(analysis, run) + "."
        )
    kinds = analysis["rank_90_by_kind"].get(analysis["reference_run"], {})
    if analysis.get("most_rank_kind"):
        kind = analysis["most_rank_kind"]
        parts.append(
            f"Full FT's change needs the most rank in {kind} (rank holding 90% of its energy: {kinds[kind]:.1f} on "
            "average over layers; " + ", ".join(f"{k} {v:.1f}" for k, v in kinds.items() if k != kind) + ")."
        )
    return " ".join(parts)


def concentrated_clause(analysis: dict[str, Any], run: str) -> str:
    """Where the gap is densest, when that is not the largest bucket itself."""
    found = analysis.get("most_concentrated_bucket", {}).get(run)
    if not found or found["bucket"]["bucket"] == analysis["largest_bucket"][run]["bucket"]["bucket"]:
        return ""
    row, gap = found["bucket"], analysis["gap_by_bucket"][run]["total_gap"]
    return (
        f"; densest in {found['family'].replace('_', ' ')} bucket '{row['bucket']}' "
        f"({row['gap_contribution'] / gap:.0%} of the gap from {row['token_share']:.0%} of the tokens)"
    )


def _interval(interval) -> str:
    return f"[{interval[0]:+.4f}, {interval[1]:+.4f}]" if interval else "-"


def _recovery(row: dict[str, Any]) -> str:
    if row["recovery"] is None:
        return "-"
    interval = row["recovery_interval"]
    return f"{row['recovery']:.2f}" + (f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "")


def format_gap_tables(analysis: dict[str, Any]) -> list[str]:
    lines = [
        "### Where: the gap by token",
        "",
        "The test-NLL gap of each run to full FT (same seeds), split into buckets that add up to it: by how often the "
        "predicted token is a target in the training split, by its position in the response, by the response's "
        "length (quartiles of the training responses). Recovery is the run's share of full FT's gain over the base "
        "model in the bucket (1: all of it). Intervals: 95% over seeds and conversation trees.",
        "",
    ]
    for run, gap in analysis["gap_by_bucket"].items():
        lines += [
            f"**{run}**: gap {gap['total_gap']:+.4f} nats per token (perplexity ratio {gap['total_ratio']:.3f}).",
            "",
            "| Family | Bucket | Share of tokens | Contribution [95% CI] | Gap per token | Recovery [95% CI] |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for family, rows in gap["families"].items():
            for row in rows:
                per_token = f"{row['gap_per_token']:+.4f}" if row["gap_per_token"] is not None else "-"
                lines.append(
                    f"| {family} | {row['bucket']} | {row['token_share']:.1%} | {row['gap_contribution']:+.4f} "
                    f"{_interval(row['interval'])} | {per_token} | {_recovery(row)} |"
                )
        lines.append("")
    return lines


def format_weight_tables(analysis: dict[str, Any]) -> list[str]:
    lines = [
        "### Why: the weight change by module kind",
        "",
        "Means over layers (and seeds) of dW = W_trained - W_base: effective rank (Roy & Vetterli 2007), the rank "
        "holding 90% of its energy, intruder dimensions of W_trained (Shuttleworth et al. 2024; top "
        f"{analysis['settings']['intruder_top_k']}, epsilon {analysis['settings']['intruder_epsilon']:g}), the share "
        "of full FT's dW energy a rank-r adapter could hold at best, and the subspace similarity of the run's top-r "
        "directions to full FT's (Hu et al. 2021; beside two seeds of the same run, and random subspaces).",
        "",
        "| Run | Module kind | Effective rank | Rank for 90% | Intruders | Full FT energy at rank r | "
        "Similarity to full FT | Seed vs seed | Random |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run, modules in analysis["weights"].items():
        kinds: dict[str, list[dict[str, Any]]] = {}
        for entry in modules.values():
            kinds.setdefault(entry["kind"], []).append(entry)
        for kind, entries in sorted(kinds.items()):

            def mean(key, entries=entries):
                values = [e[key] for e in entries if e.get(key) is not None]
                return sum(values) / len(values) if values else None

            energy = {}
            for entry in entries:
                for rank, share in entry.get("energy_at_rank", {}).items():
                    energy.setdefault(rank, []).append(share)
            energy_text = ", ".join(f"r={rank}: {sum(v) / len(v):.0%}" for rank, v in energy.items()) or "-"
            cells = [mean("subspace_similarity_to_reference"), mean("subspace_similarity_between_seeds")]
            cells.append(mean("subspace_similarity_random"))
            similarity = [f"{value:.2f}" if value is not None else "-" for value in cells]
            lines.append(
                f"| {run} | {kind} | {mean('effective_rank'):.1f} | {mean('rank_90'):.1f} | {mean('intruders'):.2f} | "
                f"{energy_text} | {' | '.join(similarity)} |"
            )
    return lines + [""]


def format_mitigation_table(analysis: dict[str, Any]) -> list[str]:
    mitigation = analysis["mitigation"]
    if not mitigation["trainings"]:
        return []
    lines = [
        "### Does forgetting sit in the intruders?",
        "",
        "Each LoRA run's sweep-seed training with its intruder directions scaled by lambda (1: as trained; 0: "
        "removed), scored again on the test split and the general text. Forgetting is the change in NLL per token "
        "on the general text from the base model.",
        "",
        "| Training | lambda | Test perplexity | Forgetting | Modules with intruders |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, curve in mitigation["trainings"].items():
        for point in curve:
            forgetting = f"{point['forgetting']:+.4f}" if point["forgetting"] is not None else "-"
            lines.append(
                f"| {name} | {point['lambda']:g} | {point['test_perplexity']:.3f} | {forgetting} | "
                f"{point['modules_changed']} |"
            )
    reference = mitigation["reference"]
    if reference.get("training"):
        forgetting = f"{reference['forgetting']:+.4f}" if reference.get("forgetting") is not None else "-"
        lines.append(
            f"| {reference['training']} (full FT) | - | {reference['test_perplexity']:.3f} | {forgetting} | - |"
        )
    return lines + [""]


def format_worst(analysis: dict[str, Any]) -> list[str]:
    lines = []
    for run, rows in analysis["worst_responses"].items():
        if not rows:
            continue
        lines += [
            f"**Test responses where {run} falls furthest behind full FT** (NLL per token, mean over seeds):",
            "",
            "| Response | Tokens | Run NLL/token | Full FT NLL/token | Excerpt |",
            "|---|---:|---:|---:|---|",
        ]
        for row in rows:
            excerpt = row["excerpt"].replace("|", "\\|")
            lines.append(
                f"| {row['message_id']} | {row['tokens']} | {row['nll_per_token']:.3f} | "
                f"{row['reference_nll_per_token']:.3f} | {excerpt} |"
            )
        lines.append("")
    return lines


def format_analysis_markdown(analysis: dict[str, Any], figure_paths: dict[str, Path]) -> str:
    lines = ["## Where and why LoRA falls short", "", analysis["verdict_paragraph"], ""]
    lines += format_gap_tables(analysis)
    lines += format_weight_tables(analysis)
    lines += format_mitigation_table(analysis)
    lines += format_worst(analysis)
    for kind, path in figure_paths.items():
        lines += [f"![{path.stem}]({path.name})", "", FIGURE_SENTENCES[kind], ""]
    lines.append("Every number here is in analysis.json (schema: docs/analysis.md).")
    return "\n".join(lines) + "\n"


def results_block(analysis: dict[str, Any]) -> str:
    """What goes at the top of results.md: the verdict and the figures, each with how to read it."""
    lines = ["## Verdict: LoRA against full fine-tuning", "", analysis["verdict_paragraph"], ""]
    for kind, path in analysis["figures"].items():
        lines += [f"![{Path(path).stem}]({Path(path).name})", "", FIGURE_SENTENCES[kind], ""]
    lines.append(
        "The gap by bucket, the weight change by module kind, the mitigation curve and the worst responses: "
        "[analysis.md](analysis.md); every number in analysis.json."
    )
    return "\n".join(lines) + "\n"


def insert_into_results(results_md: Path, block: str) -> bool:
    """Put the analysis block right under results.md's title (replacing an earlier one); True when the file
    changed."""
    if not block or not results_md.exists():
        return False
    text = results_md.read_text(encoding="utf-8")
    marked = f"{ANALYSIS_START}\n{block.strip()}\n{ANALYSIS_END}\n"
    start, end = text.find(ANALYSIS_START), text.find(ANALYSIS_END)
    if start >= 0 and end > start:
        updated = text[:start] + marked + text[end + len(ANALYSIS_END) :].lstrip("\n")
    else:
        title_end = text.find("\n", text.find("# ")) + 1 if text.startswith("# ") else 0
        updated = text[:title_end] + "\n" + marked + "\n" + text[title_end:].lstrip("\n")
    if updated == text:
        return False
    atomic_write_text(results_md, updated)
    return True
