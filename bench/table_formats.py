"""Rendering a built table (bench.tables.Report) in one of four formats: markdown, latex (booktabs), csv (tidy,
one line per cell), json.

    print(table_formats.render(tables.build(collect.load("runs/quickstart")), "markdown"))
"""
from __future__ import annotations

import csv
import io
import json

from bench.errors import BenchError
from bench.tables import COST_COLUMNS, Cell, Report

FORMATS = ("markdown", "latex", "csv", "json")


def _acc_text(cell: Cell, plus: str = " ± ") -> str:
    return f"{100 * cell.mean:.1f}{plus}{100 * cell.se:.1f}" if cell.se is not None else f"{100 * cell.mean:.1f}"


def cell_text(col: str, cell: Cell, plus: str = " ± ", dash: str = "—") -> str:
    if cell.mean is None:
        return dash
    if col in COST_COLUMNS:
        return f"{cell.mean:.{COST_COLUMNS[col][2]}f}"
    if cell.nats:
        return f"{cell.mean:.3f}{plus}{cell.se:.3f}" if cell.se is not None else f"{cell.mean:.3f}"
    return _acc_text(cell, plus)


def markdown(report: Report) -> str:
    out = []
    for sec in report.sections:
        if sec.title:
            out.append(f"### {sec.title}\n")
        head = ["method"] + [sec.headers[c] for c in sec.columns]
        body = []
        for lab in sec.rows:
            line = [lab]
            for c in sec.columns:
                cell = sec.cells[(lab, c)]
                marks = "".join(f" [{i}]" for i in cell.notes)
                line.append(cell_text(c, cell) + marks)
            body.append(line)
        widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
        right = [False] + [True] * len(sec.columns)
        fmt = lambda r: "| " + " | ".join(x.rjust(w) if rj else x.ljust(w) for x, w, rj in zip(r, widths, right)) + " |"
        out.append(fmt(head))
        rule = [("-" * (w + 1) + ":") if rj else ("-" * (w + 2)) for w, rj in zip(widths, right)]
        out.append("|" + "|".join(rule) + "|")
        out += [fmt(r) for r in body]
        out.append("")
    for line in report.header_lines:  # paragraphs and lists, so that rendered markdown keeps the lines apart
        out += [line, ""]
    if report.notes:
        out += [f"- [{i}] {t}" for i, t in enumerate(report.notes, 1)] + [""]
    out += [f"- {t}" for t in report.footer]
    return "\n".join(out).rstrip("\n") + "\n"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "—": "---", "…": "..."}


def tex(text: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(text))


def latex(report: Report) -> str:
    """A table float per section (booktabs), notes below; needs \\usepackage{booktabs}."""
    out = []
    for k, sec in enumerate(report.sections):
        out += [r"\begin{table}[t]", r"\centering", r"\small"]
        if sec.title:
            out.append(r"\caption{" + tex(sec.title) + "}")
        out.append(r"\begin{tabular}{l" + "r" * len(sec.columns) + "}")
        out.append(r"\toprule")
        out.append(" & ".join(["Method"] + [tex(sec.headers[c]) for c in sec.columns]) + r" \\")
        out.append(r"\midrule")
        for lab in sec.rows:
            line = [tex(lab)]
            for c in sec.columns:
                cell = sec.cells[(lab, c)]
                marks = r"\textsuperscript{" + ",".join(map(str, cell.notes)) + "}" if cell.notes else ""
                line.append(cell_text(c, cell, plus=r" $\pm$ ", dash="--") + marks)
            out.append(" & ".join(line) + r" \\")
        out += [r"\bottomrule", r"\end{tabular}"]
        if k == len(report.sections) - 1:
            out += ["", r"\smallskip", r"\parbox{\linewidth}{\footnotesize\raggedright"]
            out += [tex(t) + r"\par" for t in report.header_lines]
            out += [f"{i}. " + tex(t) + r"\par" for i, t in enumerate(report.notes, 1)]
            out += [tex(t) + r"\par" for t in report.footer]
            out.append("}")
        out += [r"\end{table}", ""]
    return "\n".join(out)


def _records(report: Report) -> list[dict]:
    recs = []
    for sec in report.sections:
        for lab in sec.rows:
            for c in sec.columns:
                cell = sec.cells[(lab, c)]
                is_cost = c in COST_COLUMNS
                scale = 1 if is_cost or cell.nats else 100
                recs.append({
                    "table": sec.title or "", "row": lab, "column": sec.headers[c], "key": c,
                    "mean": None if cell.mean is None else round(scale * cell.mean, 4),
                    "se": None if cell.se is None else round(scale * cell.se, 4),
                    "n": cell.n, "unit": "value" if is_cost else "nats" if cell.nats else "%",
                    "notes": [report.notes[i - 1] for i in cell.notes]})
    return recs


def to_csv(report: Report) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["metric", "selection", "table", "row", "column", "mean", "se", "n", "unit", "notes"])
    for r in _records(report):
        w.writerow([report.metric, report.selection, r["table"], r["row"], r["column"],
                    "" if r["mean"] is None else r["mean"], "" if r["se"] is None else r["se"], r["n"], r["unit"],
                    " | ".join(r["notes"])])
    return buf.getvalue()


def to_json(report: Report) -> str:
    return json.dumps({"metric": report.metric, "selection": report.selection,
                       "description": report.header_lines, "cells": _records(report),
                       "notes": report.notes, "footer": report.footer}, indent=1, ensure_ascii=False) + "\n"


def render(report: Report, fmt: str = "markdown") -> str:
    if fmt == "markdown":
        return markdown(report)
    if fmt == "latex":
        return latex(report)
    if fmt == "csv":
        return to_csv(report)
    if fmt == "json":
        return to_json(report)
    raise BenchError(f"--format: unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")

