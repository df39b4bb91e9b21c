"""One perplexity: oracle simulation, evaluation and the paired scoring report the same teacher perplexity on
the same windows."""
from __future__ import annotations

import math

import numpy as np
import pytest

import radial_jax as rj
from radial_jax.data import eval_windows, window_batches
from radial_jax.models.perplexity import perplexity


def test_perplexity_is_exp_mean_nll_and_overflows_to_inf():
    assert perplexity(2.0, 2) == pytest.approx(math.e)
    assert perplexity(1e6, 1) == math.inf  # no overflow warning, no exception
    with pytest.raises(ValueError, match="at least one scored token"):
        perplexity(0.0, 0)


def test_simulated_and_evaluated_teacher_perplexity_agree():
    """The pipeline's windows (``eval_windows``): ``simulate`` at threshold 0 and ``evaluate``'s teacher
    row score the same tokens, so the teacher perplexity is the same number; 7 windows in batches of 4
    (a smaller last batch) are all counted by both."""
    from radial_jax.training.evaluate import teacher_stats
    model = rj.build(rj.OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                                  num_attention_heads=2, max_position_embeddings=32), seed=0)
    tokens = np.random.default_rng(0).integers(3, 64, 7 * 12 + 5).astype(np.int32)
    ids, mask, score = eval_windows(tokens, 12)
    assert ids.shape == (7, 12) and mask.all() and not score[:, 0].any() and score[:, 1:].all()
    sim = rj.simulate_skipping(model, window_batches((ids, mask, score), 4), [0.0], progress=False)
    teacher = teacher_stats(model, ids, batch_size=4)
    assert sim.results[0].perplexity == pytest.approx(teacher["ppl"], rel=1e-6)
    # the per-window NLL evaluation keeps (the pipeline's paired comparisons reuse it) is the paired scoring's
    from radial_jax.training.paired import window_nll
    paired_nll, scored = window_nll(model, ids, batch_size=3)
    np.testing.assert_allclose(teacher["window_nll"], paired_nll, rtol=1e-5)
    assert perplexity(paired_nll.sum(), scored.sum()) == pytest.approx(teacher["ppl"], rel=1e-6)
    with pytest.raises(ValueError, match="fewer than one window of 12"):
        eval_windows(tokens[:10], 12)
