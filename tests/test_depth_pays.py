"""``experiments/depth_pays.py``: the L against L/2 layers study, on tiny settings."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))


def test_depth_pays_pairs_each_seed_and_pools_them_and_a_rerun_reuses_every_model(tmp_path, capsys):
    import depth_pays
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog, and the dog sleeps on. " * 80)
    argv = ["--out", str(tmp_path / "runs"), "--data", str(text), "--size", "tiny", "--steps", "2,3", "--seeds",
            "0,1", "--window", "8", "--batch-size", "4", "--eval-windows", "8", "--bootstrap", "200",
            "--results", str(tmp_path / "r.json"), "--png", str(tmp_path / "p.png")]
    assert depth_pays.main(argv) == 0
    doc = json.loads((tmp_path / "r.json").read_text())
    assert [f["key"] for f in doc["figures"]] == ["depth_pays_2", "depth_pays_3"]
    assert (tmp_path / "p.png").stat().st_size > 0
    for row in doc["details"]["rows"]:
        assert (row["layers"], row["half_layers"]) == (2, 1) and len(row["seeds"]) == 2
        # the pooled ratio, computed again from the stage files: each window's NLL averaged over the seeds
        stages = {(d, s): json.loads((tmp_path / "runs" / f"L{d}_steps{row['steps']}_seed{s}.json").read_text())
                  for d in (1, 2) for s in (0, 1)}
        assert stages[2, 0]["nll"] != stages[2, 1]["nll"]  # the seeds give different models
        deep = np.mean([stages[2, s]["nll"] for s in (0, 1)], 0)
        half = np.mean([stages[1, s]["nll"] for s in (0, 1)], 0)
        tokens = np.sum(stages[2, 0]["scored"])
        assert row["pooled"]["ratio"] == pytest.approx(np.exp((deep.sum() - half.sum()) / tokens), rel=1e-9)
        for s in row["seeds"] + [row["pooled"]]:
            assert s["low"] <= s["ratio"] <= s["high"]
    capsys.readouterr()
    assert depth_pays.main(argv) == 0
    assert capsys.readouterr().out.count("reusing") == 8
