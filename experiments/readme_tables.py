"""Write the measured figures from the committed JSON under ``results/``: no hand-typed numbers.

Every ``results/*.json`` written by ``benchlib.write_result`` holds a list of ``figures``. This script
renders the headline figures (``HEADLINES``) between the markers ``<!-- results:begin -->`` and
``<!-- results:end -->`` of README.md, and every figure, one table per machine, between the same markers of
``docs/results.md`` (whose prose says how to read them).
``--check`` exits 1 (naming the file) if either is not what the files give; the test suite runs it.

    python experiments/readme_tables.py            # rewrite both
    python experiments/readme_tables.py --check    # are they up to date?
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from radial_jax.reporting.files import atomic_write_text  # noqa: E402

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
RESULTS_PAGE = "docs/results.md"

# The figures a reader of the README needs first, as (results file, figure key): what routing gains or loses
# against the simplest alternatives on the real model and on the toy, whether depth pays on the toy, and
# what the machinery costs or saves when serving, and how long the README's first command takes. Every other
# figure is in docs/results.md.
HEADLINES = (
    ("real_gemma_longer.json", "real_student_0_vs_adapted_static_drop"),
    ("reuse_probe_gemma.json", "reuse_probe_17_adapted"),
    ("depth_pays.json", "depth_pays_6000"),
    ("pipeline.json", "pipeline_ordered_vs_half"),
    ("pipeline.json", "pipeline_seconds"),
    ("radial_vs_ordered.json", "radial_vs_ordered"),
    ("joint_recipes_6000.json", "joint_looped_fresh_kv_vs_half_6000"),
    ("bench_radial_125m.json", "prefill_radial_fit_d50"),
    ("bench_models.json", "decode_b4_p64"),
)


def _number(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int,)) or (isinstance(v, float) and v.is_integer() and abs(v) >= 100):
        return f"{int(v):,}"
    a = abs(v)
    return f"{v:.3g}" if a < 10 else f"{v:.1f}" if a < 1000 else f"{v:,.0f}"


def _value(fig: dict) -> str:
    unit = fig.get("unit") or ""
    text = f"{_number(fig['value'])}{unit}"
    if fig.get("spread"):
        lo, hi = fig["spread"]
        text += f" ({_number(lo)}–{_number(hi)}, {fig.get('rounds', '?')} rounds)"
    return text


def _met(fig: dict) -> str:
    return {True: "✔", False: "✘", None: ""}[fig.get("met")]


def _machine(doc: dict) -> str:
    m = doc.get("machine", {})
    return (f"{m.get('device', m.get('processor', '?'))}, {m.get('cpu_count', '?')} CPUs, jax {m.get('jax', '?')}"
            + (f", torch {m['torch']}" if m.get("torch") else ""))


def render(results_dir: Path, only=None) -> str:
    """The tables of the figures in ``results_dir``, one per machine; ``only``: ``(file, key)`` pairs to keep, in
    that order (a pair that names no figure is an error: a headline never disappears silently)."""
    docs = [json.loads(p.read_text()) | {"_file": p.name} for p in sorted(results_dir.glob("*.json"))]
    docs = [d for d in docs if d.get("figures")]
    if not docs:
        return "_No benchmark results yet: run the scripts in `experiments/`._\n"
    rows = [(d, fig) for d in docs for fig in d["figures"]]
    if only is not None:
        found = {(d["_file"], fig["key"]): (d, fig) for d, fig in rows}
        missing = [pair for pair in only if pair not in found]
        if missing:
            raise ValueError(f"headline figures not in {results_dir}: {missing}")
        rows = [found[pair] for pair in only]
    by_machine = {}
    for d, fig in rows:
        by_machine.setdefault(_machine(d), []).append((d, fig))
    out = []
    for mach, group in by_machine.items():
        out.append(f"Measured on {mach}:\n")
        out.append("| figure | measured (median, spread) | target | | source |")
        out.append("| --- | --- | --- | --- | --- |")
        for d, fig in group:
            note = f" ({fig['note']})" if fig.get("note") else ""
            out.append(f"| {fig['label']}{note} | {_value(fig)} | {fig.get('target') or ''} | {_met(fig)} | "
                       f"`results/{d['_file']}` |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def updated_readme(readme: str, tables: str, name: str = "README.md") -> str:
    """``readme`` with ``tables`` between its markers (``name``: the file, for the error)."""
    if BEGIN not in readme or END not in readme:
        raise ValueError(f"{name} has no {BEGIN} ... {END} section to write the tables into")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{tables}{END}{tail}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if README.md or docs/results.md differs")
    ap.add_argument("--readme", default=str(ROOT / "README.md"))
    ap.add_argument("--page", default=str(ROOT / RESULTS_PAGE), help="the page of every figure")
    ap.add_argument("--results", default=str(ROOT / "results"))
    args = ap.parse_args(argv)
    results = Path(args.results)
    readme_path, page_path = Path(args.readme), Path(args.page)
    headline = render(results, only=HEADLINES) + f"\nEvery figure, by file: [`{RESULTS_PAGE}`]({RESULTS_PAGE}).\n"
    wanted = {readme_path: updated_readme(readme_path.read_text(), headline),
              page_path: updated_readme(page_path.read_text(), render(results), RESULTS_PAGE)}
    if args.check:
        stale = [str(path) for path, text in wanted.items() if path.read_text() != text]
        if stale:
            print(f"{', '.join(stale)} not what results/*.json give; run `python experiments/readme_tables.py`",
                  file=sys.stderr)
            return 1
        return 0
    for path, text in wanted.items():
        atomic_write_text(path, text)
    print(f"wrote the results tables of {readme_path} and {page_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
