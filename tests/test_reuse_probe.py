"""``experiments/reuse_probe.py``: the static-route probe of layer reuse, on a tiny model trained-here style."""
import json
import sys
from pathlib import Path

import jax
import numpy as np

import radial_jax as rj
from radial_jax.models.bundle import Model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))


def _plain_nll(model, windows):
    """Summed next-token NLL by a NumPy log-softmax, written apart from ``window_nll``."""
    logits = np.asarray(model(windows), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    return -np.take_along_axis(logp[:, :-1], windows[:, 1:, None], -1).sum()


def test_reuse_probe_picks_the_best_repeat_and_greedy_routes_and_a_rerun_reuses_every_score(tmp_path, capsys):
    import reuse_probe
    from radial_jax.data.corpus import OFFLINE_TOKENIZER_PREFIX
    from radial_jax.profiling.layer_drop import route_layers
    from radial_jax.checkpoints.artifacts import save_model
    built = rj.build(rj.OPTConfig(vocab_size=2048, hidden_size=32, num_hidden_layers=4, ffn_dim=64,
                                  num_attention_heads=2, max_position_embeddings=64), seed=3)
    model = Model(built.config, built.params, name="tiny", tokenizer_path=f"{OFFLINE_TOKENIZER_PREFIX}2048")
    save_model(model, tmp_path / "model")
    argv = ["--model", str(tmp_path / "model"), "--out", str(tmp_path / "runs"), "--drops", "1,2", "--window", "16",
            "--calibration-windows", "2", "--eval-windows", "6", "--batch-size", "2", "--bootstrap", "200",
            "--adapt-steps", "2", "--target-windows", "4", "--results", str(tmp_path / "r.json")]
    assert reuse_probe.main(argv) == 0
    doc = json.loads((tmp_path / "r.json").read_text())
    assert [f["key"] for f in doc["figures"]] == ["reuse_probe_3", "reuse_probe_3_adapted", "reuse_probe_2",
                                                  "reuse_probe_2_adapted"]
    greedy = {int(v): r for v, r in doc["details"]["greedy_routes"].items()}
    assert sorted(greedy) == [1, 2, 3, 4] and all(len(r) == v for v, r in greedy.items())
    for v in (1, 2, 3):  # each greedy route is the previous one less one layer
        assert all(i in greedy[v + 1] for i in greedy[v]) and greedy[v] == sorted(greedy[v])
    from radial_jax.data.packed import model_text_data
    calib = model_text_data("stdlib", model).windows(16, 2, split="train")[0]
    for row in doc["details"]["rows"]:
        v, route = row["visits"], row["routes"]["one repeat"]
        base = greedy[v - 1]
        candidates = [base[:i + 1] + [base[i]] + base[i + 1:] for i in range(len(base))]
        assert route in candidates  # one layer run twice in a row, the rest the greedy route of v - 1 visits
        scores = [_plain_nll(route_layers(model, c), calib) for c in candidates]
        assert _plain_nll(route_layers(model, route), calib) <= min(scores) + 1e-3 * abs(min(scores))
        assert row["routes"]["no repeat (greedy)"] == greedy[v]
        for key in ("repeat_vs_no_repeat", "adapted_repeat_vs_no_repeat"):
            r = row[key]
            assert r["low"] <= r["ratio"] <= r["high"]
        # adapters trained for both winners, one per visit: the repeated layer's two visits got their own
        assert (tmp_path / "runs" / ("adapt_" + "-".join(map(str, route)) + "_run")).is_dir()
        assert row["perplexity"]["one repeat, adapted"] != row["perplexity"]["one repeat"]
    capsys.readouterr()
    jax.clear_caches()
    assert reuse_probe.main(argv) == 0
    printed = capsys.readouterr().out
    assert "reusing" in printed and not any(line.startswith("[") and line.endswith(" s") for line in
                                             printed.splitlines())
