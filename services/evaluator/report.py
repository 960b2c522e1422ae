"""Evaluation reports: markdown tables, and the report of a set of runs (markdown + HTML + PNG plots).

`markdown_table` / `format_cell` are the GitHub-flavoured tables that benchmarks and evaluations
print. `build_report` turns run records (the JSON files under `<RAGFLEET_HOME>/runs/`) into a
folder with:

- `report.md` and `report.html` (self-contained: inline CSS, images referenced by relative path);
- `pareto.png`: quality (the primary metric) against p50 total latency, the Pareto front
  (no other run is both at least as fast and at least as good) drawn as a staircase;
- `latency_breakdown.png`: mean per-stage latency per run, stacked;
- `metrics.png`: every aggregate metric per run, grouped bars.

The report has a summary table (only the config fields that vary across runs, so a sweep reads as
its swept parameters), the Pareto-optimal runs, and a paired significance test for every pair of
runs (`services.evaluator.significance.compare_runs`; the randomization test decides). Runs are
labelled by their varying config fields ("faiss, 128 tok"). Both documents are rendered from one
list of sections, so they always say the same thing. Every file is written atomically.

Figures are plain `matplotlib.figure.Figure` objects drawn on the Agg canvas, never registered with
pyplot: there is no global figure state to leak or close, and no display is needed.
"""

from __future__ import annotations

import html
import io
import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from services.evaluator.significance import DEFAULT_ALPHA, DEFAULT_TRIALS, compare_runs
from services.runtime.storage import atomic_write_bytes

# The keys of a run record (services.evaluator.experiments) that a report reads.
REPORT_KEYS = ("run_id", "config", "aggregate", "per_query", "latency_ms")
STAGE_ORDER = ("retrieve", "fuse", "rerank", "generate")


def format_value(value: Any) -> str:
    """Floats with 4 significant digits below 1000 and 1 decimal above; None as a dash."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


def format_cell(value: Any) -> str:
    """`format_value`, with `|` escaped for a markdown table cell."""
    return format_value(value).replace("|", "\\|")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """One line per row, one column per name in `columns`; a row's missing keys show as a dash."""
    numeric = _numeric_columns(rows, columns)
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---:" if is_number else "---" for is_number in numeric) + "|",
    ]
    lines += ["| " + " | ".join(format_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def html_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """The HTML twin of `markdown_table`: escaped text, numeric columns right-aligned."""
    numeric = _numeric_columns(rows, columns)

    def cells(tag: str, values: Sequence[str]) -> str:
        return "".join(
            f"<{tag}{' class=num' if is_number else ''}>{html.escape(value)}</{tag}>"
            for value, is_number in zip(values, numeric)
        )

    lines = ["<table>", f"<thead><tr>{cells('th', columns)}</tr></thead>", "<tbody>"]
    lines += [f"<tr>{cells('td', [format_value(row.get(c)) for c in columns])}</tr>" for row in rows]
    lines += ["</tbody>", "</table>"]
    return "\n".join(lines)


def _numeric_columns(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> list[bool]:
    return [all(isinstance(row.get(c), int | float | None) for row in rows) for c in columns]


# ---------------------------------------------------------------------------------------------
# Loading run records


def load_records(paths_or_ids: list[str], runs_dir: Path) -> list[dict]:
    """Reads run records, in the order given.

    Each item is a path to a JSON file (anything that exists as a file, ends in `.json` or contains
    a `/`) or a run id, read from `runs_dir/<run_id>.json`. Raises FileNotFoundError naming the
    missing file (and the run ids `runs_dir` does hold), ValueError for a file that is not JSON or
    lacks the keys a report needs.
    """
    if not paths_or_ids:
        raise ValueError("no runs given: pass run ids or paths to run JSON files")
    records = []
    for item in paths_or_ids:
        path = Path(item)
        if not path.is_file() and not (item.endswith(".json") or "/" in item):
            path = Path(runs_dir) / f"{item}.json"
            if not path.is_file():
                known = sorted(p.stem for p in Path(runs_dir).glob("*.json"))
                shown = ", ".join(known[:10]) + (", …" if len(known) > 10 else "") if known else "none"
                raise FileNotFoundError(f"no run {item!r} in {runs_dir} (runs there: {shown})")
        elif not path.is_file():
            raise FileNotFoundError(f"run file {path} does not exist")
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        missing = [key for key in REPORT_KEYS if not isinstance(record, dict) or key not in record]
        if missing:
            raise ValueError(f"{path} is not a run record: missing {', '.join(missing)}")
        records.append(record)
    return records


# ---------------------------------------------------------------------------------------------
# What the report computes


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the Pareto-optimal `(latency, quality)` points, fastest first.

    A point is optimal unless another point is at least as fast and at least as good, and strictly
    better in one of the two. Identical points are all optimal (neither dominates the other).
    """
    front = [
        i
        for i, (latency, quality) in enumerate(points)
        if not any(
            other_latency <= latency
            and other_quality >= quality
            and (other_latency < latency or other_quality > quality)
            for other_latency, other_quality in points
        )
    ]
    return sorted(front, key=lambda i: (points[i][0], i))


def varying_config_fields(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Config fields whose value is not the same in every record, in config order."""
    fields = list(dict.fromkeys(key for record in records for key in record["config"]))
    return [
        field
        for field in fields
        if len({json.dumps(record["config"].get(field), sort_keys=True) for record in records}) > 1
    ]


def run_labels(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Short labels from the varying config fields ("faiss, 128 tok"); the run id when none vary.

    Runs whose labels would coincide get their run id appended.
    """
    fields = varying_config_fields(records)
    if not fields:
        return [record["run_id"] for record in records]
    labels = [", ".join(_describe(f, record["config"].get(f)) for f in fields) for record in records]
    counts = {label: labels.count(label) for label in labels}
    return [
        label if counts[label] == 1 else f"{label} ({record['run_id']})"
        for label, record in zip(labels, records)
    ]


def _describe(field: str, value: Any) -> str:
    """One config value as a label fragment."""
    match field, value:
        case "chunk_tokens", _:
            return f"{value} tok"
        case "overlap_tokens", _:
            return f"{value} overlap"
        case "whole_documents", _:
            return "whole docs" if value else "chunked"
        case "retrievers", list():
            return "+".join(map(str, value))
        case "rerank", None | False | "":
            return "no rerank"
        case "rerank", True:
            return "rerank"
        case "rerank", _:
            return f"rerank {value}"
        case "top_k", _:
            return f"k={value}"
        case "temperature", _:
            return f"T={value}"
        case _, None:
            return f"no {field}"
    return format_value(value)


def _config_cell(value: Any) -> Any:
    """A config value for a summary table cell: lists joined with '+', the rest as is."""
    return "+".join(map(str, value)) if isinstance(value, list) else value


def _primary_metric(records: Sequence[Mapping[str, Any]], metric: str | None) -> str:
    common = [m for m in records[0]["aggregate"] if all(m in r["aggregate"] for r in records[1:])]
    if metric is not None:
        if metric not in common:
            raise ValueError(f"metric {metric!r} is not in every run's aggregate (shared: {common})")
        return metric
    if not common:
        raise ValueError("the runs share no aggregate metric")
    for preferred in ("ndcg@10", "f1"):
        if preferred in common:
            return preferred
    return common[0]


# ---------------------------------------------------------------------------------------------
# Plots


def _save_png(fig: Figure, path: Path) -> Path:
    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def plot_pareto(records: Sequence[Mapping[str, Any]], labels: Sequence[str], metric: str, path: Path) -> Path:
    """Quality against p50 total latency, every run labelled, the Pareto front highlighted."""
    points = [(r["latency_ms"]["p50_total"], r["aggregate"][metric]) for r in records]
    front = pareto_front(points)
    fig = Figure(figsize=(8, 5.5), dpi=100, layout="constrained")
    ax = fig.subplots()
    latencies, qualities = zip(*points)
    ax.scatter(latencies, qualities, color="tab:gray", zorder=2, label="run")
    ax.step(
        [points[i][0] for i in front],
        [points[i][1] for i in front],
        where="post",
        color="tab:red",
        linewidth=2,
        marker="o",
        markersize=8,
        zorder=3,
        label="Pareto front",
    )
    for (latency, quality), label in zip(points, labels):
        ax.annotate(label, (latency, quality), xytext=(5, 5), textcoords="offset points", fontsize=8)
    if min(latencies) > 0 and max(latencies) / min(latencies) > 20:
        ax.set_xscale("log")
    ax.margins(0.15)
    ax.set_xlabel("p50 total latency (ms)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs latency (up and left is better)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    return _save_png(fig, path)


def plot_latency_breakdown(records: Sequence[Mapping[str, Any]], labels: Sequence[str], path: Path) -> Path:
    """Stacked horizontal bars of the mean latency of each stage, one bar per run.

    When a run's mean total exceeds the sum of its stages, the rest is a grey "other" segment.
    """
    seen = dict.fromkeys(s for r in records for s in r["latency_ms"]["mean"] if s != "total")
    stages = [s for s in STAGE_ORDER if s in seen] + [s for s in seen if s not in STAGE_ORDER]
    fig = Figure(figsize=(9, 5), dpi=100, layout="constrained")
    ax = fig.subplots()
    left = [0.0] * len(records)
    for stage in stages:
        widths = [float(r["latency_ms"]["mean"].get(stage) or 0.0) for r in records]
        ax.barh(range(len(records)), widths, left=left, label=stage)
        left = [a + b for a, b in zip(left, widths)]
    # Client-side wall time the stages do not account for (stream reading, network, scheduling).
    other = [max(0.0, float(r["latency_ms"]["mean"].get("total", 0.0)) - x) for r, x in zip(records, left)]
    if any(other):
        ax.barh(range(len(records)), other, left=left, label="other (to total)", color="lightgray")
    ax.set_yticks(range(len(records)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("mean latency (ms)")
    ax.set_title("Per-stage latency")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(loc="lower right")
    return _save_png(fig, path)


def plot_metrics(records: Sequence[Mapping[str, Any]], labels: Sequence[str], path: Path) -> Path:
    """Grouped bars: one group per aggregate metric, one bar per run."""
    metrics = list(dict.fromkeys(m for r in records for m in r["aggregate"]))
    fig = Figure(figsize=(10, 5), dpi=100, layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(records)
    for k, (record, label) in enumerate(zip(records, labels)):
        offsets = [i - 0.4 + width * (k + 0.5) for i in range(len(metrics))]
        values = [float(record["aggregate"].get(m) or 0.0) for m in metrics]
        ax.bar(offsets, values, width=width, label=label)
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set_ylabel("score")
    ax.set_title("Aggregate metrics")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save_png(fig, path)


# ---------------------------------------------------------------------------------------------
# Documents: one list of sections, rendered as markdown and as HTML


@dataclass(frozen=True)
class Table:
    rows: list[dict[str, Any]]
    columns: list[str]

    def markdown(self) -> str:
        return markdown_table(self.rows, self.columns)

    def html(self) -> str:
        return html_table(self.rows, self.columns)


@dataclass(frozen=True)
class Image:
    src: str
    alt: str

    def markdown(self) -> str:
        return f"![{self.alt}]({self.src})"

    def html(self) -> str:
        return f'<img src="{html.escape(self.src)}" alt="{html.escape(self.alt)}">'


@dataclass(frozen=True)
class Bullets:
    items: list[str]

    def markdown(self) -> str:
        return "\n".join(f"- {item}" for item in self.items)

    def html(self) -> str:
        return "<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in self.items) + "</ul>"


@dataclass(frozen=True)
class Paragraph:
    text: str

    def markdown(self) -> str:
        return self.text

    def html(self) -> str:
        return f"<p>{html.escape(self.text)}</p>"


Block = str | Table | Image | Bullets  # a str is a paragraph


def _block(block: Block) -> Table | Image | Bullets | Paragraph:
    return Paragraph(block) if isinstance(block, str) else block


def render_markdown(title: str, sections: Sequence[tuple[str, Sequence[Block]]]) -> str:
    parts = [f"# {title}"]
    for heading, blocks in sections:
        parts += [f"## {heading}", *(_block(block).markdown() for block in blocks)]
    return "\n\n".join(parts) + "\n"


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
h1, h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: left; }
th { background: #f3f3f3; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) { background: #fafafa; }
img { max-width: 100%; display: block; margin: 1em 0; }
"""


def render_html(title: str, sections: Sequence[tuple[str, Sequence[Block]]]) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        f'<head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_CSS}</style></head>',
        "<body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for heading, blocks in sections:
        parts += [f"<h2>{html.escape(heading)}</h2>", *(_block(block).html() for block in blocks)]
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------
# The report


def build_report(
    records: list[dict], out_dir: Path, *, metric: str | None = None, title: str | None = None
) -> dict:
    """Writes report.md, report.html and the PNG plots of `records` into `out_dir`.

    `metric` is the primary metric (Pareto plot, significance tests); by default ndcg@10 if every
    run has it, else f1, else the first aggregate metric the runs share. Returns {"markdown": Path,
    "html": Path, "plots": [Path, ...]}.
    """
    if not records:
        raise ValueError("a report needs at least one run record")
    run_ids = [r["run_id"] for r in records]
    duplicates = sorted({run_id for run_id in run_ids if run_ids.count(run_id) > 1})
    if duplicates:
        raise ValueError(f"run ids given more than once: {', '.join(duplicates)}")
    metric = _primary_metric(records, metric)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = run_labels(records)
    names = [run_id if label == run_id else f"{run_id} ({label})" for run_id, label in zip(run_ids, labels)]
    experiments = sorted({str(r.get("experiment")) for r in records if r.get("experiment")})
    if title is None:
        title = "ragfleet evaluation report" + (f": {experiments[0]}" if len(experiments) == 1 else "")

    plots = [
        plot_pareto(records, labels, metric, out_dir / "pareto.png"),
        plot_latency_breakdown(records, labels, out_dir / "latency_breakdown.png"),
        plot_metrics(records, labels, out_dir / "metrics.png"),
    ]
    sections = [
        ("Summary", _summary_blocks(records, metric)),
        (
            "Plots",
            [
                Image("pareto.png", f"{metric} vs p50 latency, Pareto front highlighted"),
                Image("latency_breakdown.png", "mean per-stage latency per run"),
                Image("metrics.png", "aggregate metrics per run"),
            ],
        ),
        ("Pareto-optimal runs", _pareto_blocks(records, names, metric)),
        ("Pairwise comparisons", _comparison_blocks(records, names, metric)),
    ]

    markdown_path, html_path = out_dir / "report.md", out_dir / "report.html"
    atomic_write_bytes(markdown_path, render_markdown(title, sections).encode("utf-8"))
    atomic_write_bytes(html_path, render_html(title, sections).encode("utf-8"))
    return {"markdown": markdown_path, "html": html_path, "plots": plots}


def _summary_blocks(records: Sequence[Mapping[str, Any]], metric: str) -> list[Block]:
    datasets = sorted({f"{r['dataset']['name']} ({r['dataset']['kind']})" for r in records if "dataset" in r})
    fields = varying_config_fields(records)
    metrics = list(dict.fromkeys(m for r in records for m in r["aggregate"]))
    rows = [
        {
            "run_id": r["run_id"],
            **{f: _config_cell(r["config"].get(f)) for f in fields},
            **r["aggregate"],
            "p50 ms": r["latency_ms"].get("p50_total"),
            "p99 ms": r["latency_ms"].get("p99_total"),
            "ingest s": r.get("ingest_s"),
        }
        for r in records
    ]
    intro = (
        f"{len(records)} run(s) on {', '.join(datasets) or 'an unnamed dataset'}; primary metric {metric}. "
        "Config columns show only the fields that differ between runs."
    )
    return [intro, Table(rows, ["run_id", *fields, *metrics, "p50 ms", "p99 ms", "ingest s"])]


def _pareto_blocks(records: Sequence[Mapping[str, Any]], names: Sequence[str], metric: str) -> list[Block]:
    points = [(r["latency_ms"]["p50_total"], r["aggregate"][metric]) for r in records]
    front = pareto_front(points)
    items = [
        f"{names[i]}: {metric} {format_value(points[i][1])} at {format_value(points[i][0])} ms p50"
        for i in front
    ]
    return [
        f"Runs that no other run beats on both {metric} (higher) and p50 total latency (lower), "
        "fastest first:",
        Bullets(items),
    ]


def _comparison_blocks(
    records: Sequence[Mapping[str, Any]], names: Sequence[str], metric: str
) -> list[Block]:
    if len(records) < 2:
        return ["Only one run: nothing to compare."]
    rows, sentences = [], []
    for (i, a), (j, b) in itertools.combinations(enumerate(records), 2):
        try:
            result = compare_runs(a, b, metric)
        except ValueError:
            sentences.append(f"{names[i]} and {names[j]} share no query scored on {metric}: not compared.")
            continue
        rows.append(
            {
                "run A": result["run_a"],
                "run B": result["run_b"],
                "n": result["n"],
                "mean A": result["mean_a"],
                "mean B": result["mean_b"],
                "diff": result["diff"],
                "t-test p": result["t_test_p"],
                "randomization p": result["randomization_p"],
                "significant": "yes" if result["significant"] else "no",
            }
        )
        p = _format_p(result["randomization_p"])
        if result["significant"]:
            better, worse = (names[i], names[j]) if result["diff"] > 0 else (names[j], names[i])
            sentences.append(f"{better} is significantly better than {worse} on {metric} ({p}).")
        else:
            sentences.append(f"{names[i]} vs {names[j]}: no significant difference on {metric} ({p}).")
    intro = (
        f"Paired tests on the per-query {metric} of the queries both runs scored. A difference is "
        f"significant when the two-sided paired randomization test ({DEFAULT_TRIALS:,} sign flips) "
        f"gives p < {DEFAULT_ALPHA}; "
        "the paired t-test p-value is shown for reference. p-values are not corrected for multiple "
        "comparisons."
    )
    blocks: list[Block] = [intro]
    if rows:
        blocks.append(Table(rows, list(rows[0])))
    blocks.append(Bullets(sentences))
    return blocks


def _format_p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"
