"""Write the README's measured figures from the committed JSON under ``results/``: no hand-typed numbers.

Every ``results/*.json`` written by ``benchlib.write_result`` holds a list of
``figures``; this script renders them, one table per machine, between the
markers ``<!-- results:begin -->`` and ``<!-- results:end -->`` of README.md.
``--check`` exits 1 (naming the difference) if the README is not what the
files give; the test suite runs it.

    python experiments/readme_tables.py            # rewrite the README's tables
    python experiments/readme_tables.py --check    # is the README up to date?
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


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


def render(results_dir: Path) -> str:
    docs = [json.loads(p.read_text()) | {"_file": p.name} for p in sorted(results_dir.glob("*.json"))]
    docs = [d for d in docs if d.get("figures")]
    if not docs:
        return "_No benchmark results yet: run the scripts in `experiments/`._"
    by_machine = {}
    for d in docs:
        by_machine.setdefault(_machine(d), []).append(d)
    out = []
    for mach, group in by_machine.items():
        out.append(f"Measured on {mach}:\n")
        out.append("| figure | measured (median, spread) | target | | source |")
        out.append("| --- | --- | --- | --- | --- |")
        for d in group:
            for fig in d["figures"]:
                note = f" ({fig['note']})" if fig.get("note") else ""
                out.append(f"| {fig['label']}{note} | {_value(fig)} | {fig.get('target') or ''} | {_met(fig)} | "
                           f"`results/{d['_file']}` |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def updated_readme(readme: str, tables: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise ValueError(f"README.md has no {BEGIN} ... {END} section to write the tables into")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{tables}{END}{tail}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if README.md differs from the results")
    ap.add_argument("--readme", default=str(ROOT / "README.md"))
    ap.add_argument("--results", default=str(ROOT / "results"))
    args = ap.parse_args(argv)
    readme_path = Path(args.readme)
    readme = readme_path.read_text()
    new = updated_readme(readme, render(Path(args.results)))
    if args.check:
        if new != readme:
            print("README.md's results section is not what results/*.json give; run "
                  "`python experiments/readme_tables.py`", file=sys.stderr)
            return 1
        return 0
    readme_path.write_text(new)
    print(f"wrote the results tables of {readme_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
