"""The report writer of scripts/benchmark_methods.py: the analysis derived from the rows, the
Markdown tables (``benchmark.md``) and the plot (``benchmark_methods.png``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from benchlib.tables import labels_in_order, ratio_table

from .tasks import RECONSTRUCT_PEERS, Task

# ------------------------------------------------------------------------------ reporting


def fmt_scores(task: Task, scores: Mapping[str, float]) -> str:
    keys = (task.score, *task.extra_scores)
    return "  ".join(f"{k} {scores[k]:.4f}" for k in keys if k in scores)


def fmt_row(task: Task, row: Mapping[str, Any]) -> str:
    extra = f"  (same model as {row['same_as']})" if "same_as" in row else ""
    if row.get("predicted") is not None and row["method"] == "rd":
        extra += f"  predicted {row['predicted']:.4g} measured {row['measured']:.4g}"
    if row.get("reconstruct"):
        extra += f"  refit {row['reconstruct_s']:.1f}s ({row['solver']})"
    return (
        f"{row['label']:<34} {row['ratio']:.2f}  sparsity {row['achieved_ratio']:.4f}  "
        f"{fmt_scores(task, row['scores'])}{extra}  ({row['prune_s']:.1f}s + {row['eval_s']:.1f}s)"
    )


def main_rows(task: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rows of the main table: no diagnostics, no reconstruction."""
    return [r for r in task["rows"] if r["family"] != "diagnostic" and not r.get("reconstruct")]


def refit_rows(task: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rows of the reconstruction table: each refit method after its plain row, then
    the same masks refit with a second solver, then onnxsim's SparseGPT and Wanda."""
    rows = task["rows"]
    refit = [r for r in rows if r.get("reconstruct")]
    bases = {r["base"] for r in refit}
    out = []
    for label in labels_in_order(main_rows(task)):
        if label in bases:
            out += [r for r in rows if r["label"] == label and not r.get("reconstruct")]
            out += [r for r in refit if r["base"] == label and not r.get("compare")]
    out += [r for r in refit if r.get("compare")]
    for label in RECONSTRUCT_PEERS:
        out += [r for r in rows if r["label"] == label]
    return out


def refit_cell(task: Mapping[str, Any], row: Mapping[str, Any]) -> str:
    """The task figure; MiniLM: recall@1 / mean cosine to the dense embeddings."""
    text = f"{row['scores'][task['score']]:.3f}"
    if "cosine" in task["extra_scores"]:
        cosine = row["scores"].get("cosine")
        text += " / " + ("–" if cosine is None else f"{cosine:.3f}")
    return text


def refit_table(task: Mapping[str, Any], ratios: Sequence[float]) -> str:
    """Markdown: with and without reconstruction, one column per ratio (best in bold)."""
    rows = refit_rows(task)
    key = task["score"]
    found = {(r["label"], r["ratio"]): r for r in rows}
    best = {
        ratio: max((r["scores"][key] for r in rows if r["ratio"] == ratio), default=None)
        for ratio in ratios
    }

    def cell(label: str, ratio: float) -> str:
        row = found.get((label, ratio))
        if row is None:
            return ""
        text = refit_cell(task, row)
        if best[ratio] is not None and row["scores"][key] >= best[ratio] - 1e-12:
            text = f"**{text}**"
        return text

    return ratio_table("method", labels_in_order(rows), ratios, cell)


def refit_time_table(task: Mapping[str, Any], ratios: Sequence[float]) -> str:
    """Markdown: seconds of each refit (the whole model), and the solvers it used."""
    rows = [r for r in task["rows"] if r.get("reconstruct")]
    found = {(r["label"], r["ratio"]): r for r in rows}

    def cell(label: str, ratio: float) -> str:
        row = found.get((label, ratio))
        if row is None:
            return ""
        if "same_as" in row:
            return f"= {row['same_as'].rsplit(' @ ', 1)[0]}"
        solvers = row.get("refit_summary", {}).get("solvers", {})
        used = "+".join(f"{n} {m}" for m, n in sorted(solvers.items()))
        return f"{row['reconstruct_s']:.1f} ({used})"

    return ratio_table("refit", labels_in_order(rows), ratios, cell)


def capped_rows(task: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [r for r in task["rows"] if r["family"] == "diagnostic" and "capped" in r["label"]]


def score_table(
    task: Mapping[str, Any], ratios: Sequence[float], rows: list[dict[str, Any]]
) -> str:
    """Markdown: one row per method, one column per ratio; the best of each column in bold."""
    key = task["score"]
    extra = "mrr" if "mrr" in task["extra_scores"] else None
    cell: dict[tuple[str, float], dict[str, Any]] = {(r["label"], r["ratio"]): r for r in rows}
    best = {
        ratio: max((r["scores"][key] for r in rows if r["ratio"] == ratio), default=None)
        for ratio in ratios
    }
    head = "| method | " + " | ".join(f"{r:g}" for r in ratios) + " |"
    lines = [head, "| --- |" + " ---: |" * len(ratios)]
    for label in labels_in_order(rows):
        cells = []
        for ratio in ratios:
            row = cell.get((label, ratio))
            if row is None:
                cells.append("")
                continue
            value = row["scores"][key]
            text = f"{value:.3f}"
            if extra is not None:
                text += f" / {row['scores'][extra]:.3f}"
            if best[ratio] is not None and value >= best[ratio] - 1e-12:
                text = f"**{text}**"
            off = row["achieved_ratio"] - ratio
            if abs(off) > 0.002:
                text += f" (sparsity {row['achieved_ratio']:.3f})"
            cells.append(text)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rd_vs_best(task: Mapping[str, Any], ratios: Sequence[float]) -> list[dict[str, Any]]:
    """Per ratio: the best rd line, the best other line, and the margin (rd minus other)."""
    key = task["score"]
    rows = main_rows(task)
    out = []
    for ratio in ratios:
        at = [r for r in rows if r["ratio"] == ratio]
        rd = [r for r in at if r["family"] == "rd"]
        other = [r for r in at if r["family"] != "rd"]
        if not rd or not other:
            continue
        best_rd = max(rd, key=lambda r: r["scores"][key])
        best_other = max(other, key=lambda r: r["scores"][key])
        oneshot = [r for r in rd if r.get("steps", 1) == 1]
        best_oneshot = max(oneshot, key=lambda r: r["scores"][key]) if oneshot else None
        out.append(
            {
                "ratio": ratio,
                "best_rd": best_rd["label"],
                "best_rd_score": best_rd["scores"][key],
                "best_one_shot_rd": best_oneshot["label"] if best_oneshot else None,
                "best_one_shot_rd_score": best_oneshot["scores"][key] if best_oneshot else None,
                "best_other": best_other["label"],
                "best_other_score": best_other["scores"][key],
                "margin": best_rd["scores"][key] - best_other["scores"][key],
                "rd_is_best": best_rd["scores"][key] >= best_other["scores"][key],
            }
        )
    return out


def _spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman rank correlation (ties broken by position; None when undefined)."""
    if len(a) < 3:
        return None
    ra = np.argsort(np.argsort(np.asarray(a, dtype=np.float64))).astype(np.float64)
    rb = np.argsort(np.argsort(np.asarray(b, dtype=np.float64))).astype(np.float64)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def rank_analysis(task: Mapping[str, Any], ratios: Sequence[float]) -> list[dict[str, Any]]:
    """Does the rd objective order allocations the way the joint distortion and the task do?

    Over the distinct models our methods built at one ratio (rd with every metric and setting,
    and the baselines: all the same magnitude masks), Spearman correlations between the sum of
    single-layer distortions (the rd objective, from the one-shot curves of each metric), the
    measured joint distortion and the task figure (negated, so that + means "lower distortion,
    better task figure").
    """
    key = task["score"]
    out = []
    for ratio in ratios:
        at = [
            r
            for r in task["rows"]
            if r["family"] != "onnxsim"
            and r["ratio"] == ratio
            and "same_as" not in r
            and not r.get("reconstruct")
        ]
        if not at:
            continue
        for metric in task["metrics"]:
            have = [r for r in at if metric in r.get("curve_sum", {})]
            if len(have) < 3:
                continue
            summed = [r["curve_sum"][metric] for r in have]
            joint = [r["distortion"][metric] for r in have]
            score = [-r["scores"][key] for r in have]
            out.append(
                {
                    "ratio": ratio,
                    "metric": metric,
                    "models": len(have),
                    "sum_vs_measured": _spearman(summed, joint),
                    "measured_vs_task": _spearman(joint, score),
                    "sum_vs_task": _spearman(summed, score),
                }
            )
    return out


def write_markdown(record: Mapping[str, Any], path: Path) -> None:
    """``benchmark.md``: the header, one section per task, the timings."""
    ratios = record["config"]["ratios"]
    out = markdown_header(record)
    for task in record["tasks"]:
        out += task_section(record, task, ratios)
    out += timings_section(record)
    out.append("")
    path.write_text("\n".join(out))


def markdown_header(record: Mapping[str, Any]) -> list[str]:
    return [
        "# Benchmark: allocation methods and onnxsim's pruning passes",
        "",
        f"Written by `scripts/benchmark_methods.py` ({record['config']['date']}); command:",
        "",
        f"    {record['config']['command']}",
        "",
        "Versions: "
        + ", ".join(f"{k} {v}" for k, v in record["versions"].items() if v is not None)
        + f". {record['host']['cpus']} CPU cores (shared; load average "
        + f"{record['host']['load_start']:.1f} at the start). Total "
        + f"{record['timings']['total_s'] / 60:.1f} min.",
        "",
        "All rows are one-shot post-training pruning (no fine-tuning). rdprune-onnx's methods "
        "share the same per-layer magnitude masks and exact-count rounding and differ only in the "
        "per-layer ratios; onnxsim's passes choose their own masks (Wanda: |w|·‖x‖; SparseGPT "
        "also rewrites the kept weights). A cell is the task figure at that sparsity (fraction "
        "of the prunable weights zeroed, counted over the same layers for every row); the best "
        "of each column is in bold; a row that missed the target by more than 0.002 shows the "
        "sparsity it reached.",
        "",
        "![metric vs ratio](benchmark_methods.png)",
        "",
    ]


def task_section(
    record: Mapping[str, Any], task: Mapping[str, Any], ratios: Sequence[float]
) -> list[str]:
    """One task: the main table, then every analysis of its rows."""
    rows = main_rows(task)
    dense = task["dense"]["scores"]
    score = task["score"]
    head = f"## {task['title']}: {task['score_label']}"
    if "mrr" in task["extra_scores"]:
        head += " / MRR"
    dense_text = f"{dense[score]:.3f}"
    if "mrr" in task["extra_scores"]:
        dense_text += f" / {dense['mrr']:.3f}"
    out = [
        head,
        "",
        f"Dense model: {dense_text}. Calibration: `{task['calibration']}` "
        f"({task['calibration_samples']} samples); rd grid: {task['levels']} levels.",
        "",
        score_table(task, ratios, rows),
        "",
    ]
    out += margin_section(task, ratios)
    out += predicted_section(rows, ratios)
    out += onnxsim_section(rows)
    out += rank_section(record.get("rank_analysis", {}).get(task["name"], []))
    out += same_section(rows)
    if any(r.get("reconstruct") for r in task["rows"]):
        out += refit_section(task, ratios)
    out += diagnostics_section(task, ratios)
    for note in task["notes"]:
        out += [f"Note: {note}.", ""]
    for error in task.get("errors", []):
        out += [f"Failed: {error['label']} at {error['ratio']:g}: {error['error']}", ""]
    return out


def margin_section(task: Mapping[str, Any], ratios: Sequence[float]) -> list[str]:
    comparison = rd_vs_best(task, ratios)
    if not comparison:
        return []
    out = [
        "rd against the best other row (margin = best rd minus best other):",
        "",
        "| ratio | best rd | score | best other | score | margin |",
        "| ---: | --- | ---: | --- | ---: | ---: |",
    ]
    for c in comparison:
        out.append(
            f"| {c['ratio']:g} | {c['best_rd']} | {c['best_rd_score']:.3f} | "
            f"{c['best_other']} | {c['best_other_score']:.3f} | {c['margin']:+.3f} |"
        )
    out.append("")
    return out


def predicted_section(rows: Sequence[Mapping[str, Any]], ratios: Sequence[float]) -> list[str]:
    rd_rows = [r for r in rows if r["method"] == "rd"]
    if not rd_rows:
        return []
    found = {(r["label"], r["ratio"]): r for r in reversed(rd_rows)}  # the first of equal keys

    def cell(label: str, ratio: float) -> str:
        row = found.get((label, ratio))
        if row is None or row["predicted"] is None:
            return ""
        return (
            f"{row['predicted']:.3g} / {row['measured']:.3g} "
            f"(×{row['predicted'] / max(row['measured'], 1e-300):.2f})"
        )

    return [
        "rd: predicted distortion (sum of the chosen curve points) vs measured (the "
        "pruned model on the calibration data), in the row's own metric:",
        "",
        ratio_table("row", labels_in_order(rd_rows), ratios, cell),
        "",
    ]


def onnxsim_section(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    sims = [r for r in rows if r["family"] == "onnxsim"]
    if not sims:
        return []
    off = [r for r in sims if abs(r["achieved_ratio"] - r["ratio"]) > 0.002]
    out = []
    if off:
        out.append("onnxsim rows whose sparsity over the prunable layers is off target:")
        out.append("")
        for r in off:
            out.append(f"- {r['label']} at {r['ratio']:g}: {r['achieved_ratio']:.4f} reached")
    else:
        out.append(
            "Every onnxsim row reached its target sparsity (within 0.002) over the same "
            "prunable layers as ours."
        )
    out.append("")
    return out


def rank_section(ranks: Sequence[Mapping[str, Any]]) -> list[str]:
    if not ranks:
        return []
    out = [
        "Does the rd objective order allocations like the joint distortion and the task "
        "figure? Spearman correlations over the distinct models our methods built at "
        "each ratio (rd in every setting and the baselines; + means agreement):",
        "",
        "| ratio | metric | models | Σ curves vs measured | measured vs task | Σ curves vs task |",
        "| ---: | --- | ---: | ---: | ---: | ---: |",
    ]

    def rho(x: float | None) -> str:
        return "" if x is None else f"{x:+.2f}"

    for a in ranks:
        out.append(
            f"| {a['ratio']:g} | {a['metric']} | {a['models']} | "
            f"{rho(a['sum_vs_measured'])} | {rho(a['measured_vs_task'])} | "
            f"{rho(a['sum_vs_task'])} |"
        )
    out.append("")
    return out


def same_section(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    same: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        if "same_as" in r:
            other = r["same_as"].rsplit(" @ ", 1)[0]
            if other != r["label"]:
                same.setdefault((r["label"], other), []).append(r["ratio"])
    if not same:
        return []
    out = ["Rows that built exactly the same pruned weights as another row:", ""]
    for (label, other), at in same.items():
        out.append(f"- {label} = {other} at {', '.join(f'{x:g}' for x in at)}")
    out.append("")
    return out


def refit_section(task: Mapping[str, Any], ratios: Sequence[float]) -> list[str]:
    solver = task.get("refit_solver")
    return [
        f"### With reconstruction ({task['name']})",
        "",
        "`+ reconstruct`: the row above it (the same masks) with the kept weights and "
        "biases refit after masking, as `--reconstruct` does "
        f"(`rdprune_onnx.reconstruct.reconstruct`, solver `{solver}`, on the same "
        f"{task['calibration_samples']} calibration samples); a `(S)` suffix: the same "
        "masks refit with solver S. onnxsim's SparseGPT (its own masks and update) and "
        "Wanda rows as peers."
        + (
            " Cells: recall@1 / mean cosine of the 600 held-out embeddings to the "
            "dense model's ('–': not measured)."
            if "cosine" in task["extra_scores"]
            else ""
        ),
        "",
        refit_table(task, ratios),
        "",
        "Refit time per run in seconds (whole model, solvers used per layer; '= X': the "
        "same masks as row X, not refit again):",
        "",
        refit_time_table(task, ratios),
        "",
    ]


def diagnostics_section(task: Mapping[str, Any], ratios: Sequence[float]) -> list[str]:
    diag = [r for r in task["rows"] if r["family"] == "diagnostic"]
    if not diag:
        return []
    return [
        f"### Diagnostics ({task['name']}): rd with another grid, less calibration data, "
        "more steps, another output or capped layer ratios",
        "",
        "`capped`: the same curves, re-allocated with every layer at most at the last grid "
        "level below 1 (no 'all but one weight' option); `on pre-norm`: curves measured "
        "on the sentence vector before the L2 normalisation. See docs/findings.md.",
        "",
        score_table(task, ratios, diag),
        "",
    ]


def timings_section(record: Mapping[str, Any]) -> list[str]:
    out = [
        "## Timings",
        "",
        "Curves come from the cache when an earlier run measured them with the same model, data "
        "and settings; 'curves' is what this run measured.",
        "",
        "| model | seconds | curves (s) | pruning (s) | refit (s) | scoring (s) | rows |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for task in record["tasks"]:
        rows = task["rows"]
        curves_s = sum(r.get("timings", {}).get("curves", 0.0) for r in rows)
        prune_s = sum(r["prune_s"] for r in rows)
        refit_s = sum(r.get("reconstruct_s", 0.0) for r in rows)
        eval_s = sum(r["eval_s"] for r in rows)
        out.append(
            f"| {task['name']} | {task['seconds']:.0f} | {curves_s:.0f} | {prune_s:.0f} | "
            f"{refit_s:.0f} | {eval_s:.0f} | {len(rows)} |"
        )
    return [
        *out,
        "",
        "Rows taken from earlier runs (`--resume`) count in the sums but not in 'seconds'.",
        "",
    ]


def merge_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The first record, with the rows, notes and errors of the same model in the others."""
    merged = records[0]
    by_name = {t["name"]: t for t in merged["tasks"]}
    for other in records[1:]:
        for task in other["tasks"]:
            if task["name"] not in by_name:
                merged["tasks"].append(task)
                by_name[task["name"]] = task
                continue
            into = by_name[task["name"]]
            new = {(r["label"], r["ratio"]) for r in task["rows"]}
            into["rows"] = [r for r in into["rows"] if (r["label"], r["ratio"]) not in new] + task[
                "rows"
            ]
            into["notes"] += [n for n in task["notes"] if n not in into["notes"]]
            into["errors"] = into.get("errors", []) + task.get("errors", [])
            into["seconds"] += task["seconds"]
        merged.setdefault("merged_runs", []).append(
            {"config": other["config"], "timings": other["timings"], "host": other["host"]}
        )
        merged["timings"]["total_s"] += other["timings"]["total_s"]
    return merged


def add_analysis(record: dict[str, Any]) -> None:
    """The figures derived from the rows (recomputed by --report-only)."""
    ratios = record["config"]["ratios"]
    record["rd_vs_best"] = {t["name"]: rd_vs_best(t, ratios) for t in record["tasks"]}
    record["rank_analysis"] = {t["name"]: rank_analysis(t, ratios) for t in record["tasks"]}


def report(record: Mapping[str, Any], out_dir: Path) -> None:
    """Write the Markdown table and the plot from a record, and print the table."""
    from .plot import plot  # after this module: plot uses its row selections

    write_markdown(record, out_dir / "benchmark.md")
    plot(record, out_dir / "benchmark_methods.png")
    print()
    print((out_dir / "benchmark.md").read_text())
    print(f"wrote benchmark_methods.json, benchmark.md and benchmark_methods.png in {out_dir}")
