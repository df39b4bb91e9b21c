"""The README's benchmark tables are exactly what the committed ``results/*.json`` give (no hand-typed figures)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import readme_tables  # noqa: E402


def test_readme_is_generated_from_results():
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "readme_tables.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_render_lists_every_figure_with_its_spread_and_source(tmp_path):
    doc = {"benchmark": "b", "machine": {"device": "cpu", "cpu_count": 2, "jax": "0"}, "settings": {},
           "figures": [{"key": "k", "label": "decode", "value": 2.5, "spread": [2.1, 2.9], "rounds": 7, "unit": "×",
                        "target": "≥ 2", "met": True, "note": "tokens equal"}]}
    (tmp_path / "b.json").write_text(json.dumps(doc))
    table = readme_tables.render(tmp_path)
    assert "| decode (tokens equal) | 2.5× (2.1–2.9, 7 rounds) | ≥ 2 | ✔ | `results/b.json` |" in table


def test_headlines_keep_their_order_and_a_missing_one_is_an_error(tmp_path):
    figs = [{"key": k, "label": k, "value": 1.0} for k in ("first", "second", "third")]
    (tmp_path / "b.json").write_text(json.dumps({"machine": {}, "figures": figs}))
    table = readme_tables.render(tmp_path, only=[("b.json", "third"), ("b.json", "first")])
    assert "second" not in table and table.index("| third") < table.index("| first")
    with pytest.raises(ValueError, match="absent"):
        readme_tables.render(tmp_path, only=[("b.json", "absent")])
