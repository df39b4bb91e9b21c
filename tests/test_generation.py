"""KV-cached generation against transformers (PyTorch) and against our own full-sequence forward.

References: ``transformers.OPTForCausalLM.generate`` on the same checkpoint
(greedy tokens, EOS handling), transformers' logits warpers (temperature,
top-k, top-p), and the parallel (uncached) forward pass, which shares no cache
or repacking code with the decode path.
"""
import numpy as np
import pytest
import torch
import jax
from transformers import AutoModelForCausalLM

import radial_jax as rj
from conftest import OPT_BASE, OPT_VARIANTS, perturb_
from radial_jax.models import attention_blocks
from radial_jax.serving.decoding import first_argmax
from radial_jax.serving.generation import sample_logits, warp_logits

PAD = OPT_BASE["pad_token_id"]
LENGTHS = [7, 3, 1, 5]  # prompts of different lengths in one batch
NEW = 10


@pytest.fixture(scope="module")
def lively_opt_dir(tmp_path_factory):
    """A tiny OPT with weights perturbed strongly enough that greedy decoding does not just repeat one token."""
    from transformers import OPTConfig, OPTForCausalLM
    torch.manual_seed(5)
    d = tmp_path_factory.mktemp("opt_lively")
    perturb_(OPTForCausalLM(OPTConfig(**OPT_BASE)), 5, scale=0.5).eval().save_pretrained(d)
    return d


def padded_prompts(lengths, vocab=OPT_BASE["vocab_size"], side="left", seed=0):
    rng = np.random.default_rng(seed)
    t = max(lengths)
    ids = np.full((len(lengths), t), PAD, np.int64)
    mask = np.zeros((len(lengths), t), np.int64)
    for row, n in enumerate(lengths):
        cols = slice(t - n, t) if side == "left" else slice(0, n)
        ids[row, cols] = rng.integers(3, vocab, n)
        mask[row, cols] = 1
    return ids, mask


def hf_generate(path, ids, mask, **kwargs):
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return ref.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                            pad_token_id=PAD, **kwargs).numpy()


def assert_same_as_hf(ours, hf, pad=PAD):
    """HF stops the batch early when every row is done; the rest of ours must be padding."""
    assert ours.shape[0] == hf.shape[0] and ours.shape[1] >= hf.shape[1]
    np.testing.assert_array_equal(ours[:, :hf.shape[1]], hf)
    assert (ours[:, hf.shape[1]:] == pad).all()


# ------------------------------------------------------------------ greedy parity with transformers

@pytest.mark.parametrize("variant", ["lively"] + sorted(OPT_VARIANTS))
def test_greedy_matches_transformers_generate(variant, lively_opt_dir, tiny_opt_variants):
    path = lively_opt_dir if variant == "lively" else tiny_opt_variants[variant]
    ids, mask = padded_prompts(LENGTHS)
    ours = rj.load(path).generate(ids, mask, max_new_tokens=NEW)
    hf = hf_generate(path, ids, mask, max_new_tokens=NEW)
    assert ours.shape == (len(LENGTHS), max(LENGTHS) + NEW)
    assert_same_as_hf(ours, hf)
    if variant == "lively":  # the comparison must not be trivially satisfied by a constant output
        assert len(np.unique(ours[:, max(LENGTHS):])) > 3


def test_eos_stops_rows_like_transformers(lively_opt_dir):
    ids, mask = padded_prompts(LENGTHS)
    model = rj.load(lively_opt_dir)
    free = model.generate(ids, mask, max_new_tokens=NEW, eos_token_id=())[:, max(LENGTHS):]
    # Stop token: one that some rows produce mid-way and at least one row never produces.
    counts = {tok: sum(tok in row for row in free) for tok in np.unique(free)}
    eos = next(tok for tok, n in counts.items() if 0 < n < len(LENGTHS))
    out = model.generate(ids, mask, max_new_tokens=NEW, eos_token_id=int(eos), return_output=True)
    hf = hf_generate(lively_opt_dir, ids, mask, max_new_tokens=NEW, eos_token_id=int(eos))
    assert_same_as_hf(out.sequences, hf)
    for row, new in enumerate(free):
        hits = np.flatnonzero(new == eos)
        if hits.size:  # stopped right after its first EOS, padded afterwards
            n = hits[0] + 1
            assert out.finished[row] and out.num_new[row] == n
            np.testing.assert_array_equal(out.new_tokens[row, :n], new[:n])
            assert (out.new_tokens[row, n:] == PAD).all()
        else:
            assert not out.finished[row] and out.num_new[row] == NEW
            np.testing.assert_array_equal(out.new_tokens[row], new)


def test_all_rows_stopping_ends_the_loop(lively_opt_dir):
    ids, mask = padded_prompts([4, 2])
    model = rj.load(lively_opt_dir)
    first = model.generate(ids, mask, max_new_tokens=1, eos_token_id=())[:, -1]
    out = model.generate(ids, mask, max_new_tokens=6, eos_token_id=[int(t) for t in first], return_output=True)
    assert out.finished.all() and (out.num_new == 1).all()
    assert (out.new_tokens[:, 1:] == PAD).all()


def test_prompts_attended_in_causal_blocks_match_transformers(lively_opt_dir, monkeypatch):
    """Prefill and the parallel forward with queries in blocks of 2 (the CPU's path for long prompts)."""
    traced = []
    tiled = attention_blocks.tiled
    monkeypatch.setattr(attention_blocks, "BLOCK", 2)
    monkeypatch.setattr(attention_blocks, "tiled", lambda *a: traced.append(a[-1]) or tiled(*a))
    jax.clear_caches()  # programs traced with the default block size must not be reused
    try:
        ids, mask = padded_prompts(LENGTHS)
        model = rj.load(lively_opt_dir)
        ours = model.generate(ids, mask, max_new_tokens=NEW)
        assert traced and all(traced), "generate's prefill did not attend in causal blocks"
        assert_same_as_hf(ours, hf_generate(lively_opt_dir, ids, mask, max_new_tokens=NEW))
        traced.clear()
        logits = np.asarray(model(ids, mask))
        assert traced and all(traced), "the parallel forward did not attend in causal blocks"
        ref = AutoModelForCausalLM.from_pretrained(lively_opt_dir).eval()
        with torch.no_grad():
            want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
        real = mask.astype(bool)
        np.testing.assert_allclose(logits[real], want[real], atol=1e-4, rtol=1e-4)
    finally:
        jax.clear_caches()


# ------------------------------------------------------------------ cached decode == parallel forward

@pytest.mark.parametrize("variant", sorted(OPT_VARIANTS))
def test_incremental_decode_logits_equal_full_forward(variant, tiny_opt_variants):
    model = rj.load(tiny_opt_variants[variant])
    ids, mask = padded_prompts(LENGTHS, seed=3)
    out = model.generate(ids, mask, max_new_tokens=NEW, eos_token_id=(), output_logits=True)
    full_mask = np.concatenate([mask, np.ones((len(LENGTHS), NEW), np.int64)], axis=1)
    full = np.asarray(model(out.sequences, full_mask))  # parallel forward, no cache
    t = max(LENGTHS)
    expected = full[:, t - 1:t - 1 + NEW]  # logits that predict new token i
    np.testing.assert_allclose(out.logits, expected, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(out.new_tokens, expected.argmax(-1))


def test_right_padding_and_cache_length_do_not_change_tokens(lively_opt_dir):
    model = rj.load(lively_opt_dir)
    left_ids, left_mask = padded_prompts(LENGTHS, side="left")
    right_ids, right_mask = padded_prompts(LENGTHS, side="right")
    t = max(LENGTHS)
    left = model.generate(left_ids, left_mask, max_new_tokens=NEW)[:, t:]
    right = model.generate(right_ids, right_mask, max_new_tokens=NEW, max_len=40)[:, t:]
    np.testing.assert_array_equal(left, right)
    # each prompt alone, no padding at all
    for row, n in enumerate(LENGTHS):
        alone = model.generate(left_ids[row:row + 1, t - n:], max_new_tokens=NEW)[0, n:]
        np.testing.assert_array_equal(alone, left[row])


# ------------------------------------------------------------------ sampling

def test_greedy_choice_is_numpys_argmax_on_ties_infinities_and_nans():
    """``first_argmax`` (greedy decoding's choice) against ``np.argmax``: the first of tied maxima, rows of
    ``-inf`` (index 0), ``+inf``, and a NaN, which ``np.argmax`` (like ``jnp.argmax``) takes as the maximum."""
    rng = np.random.default_rng(0)
    x = rng.integers(-3, 4, (7, 37)).astype(np.float32)  # small integers: many ties
    x[1] = -np.inf
    x[2, [5, 20]] = np.inf
    x[3, [9, 30]] = np.nan
    x[4, 36] = x[4].max() + 1  # the last position
    x[5, 11] = np.nan
    x[5, 2] = np.inf
    np.testing.assert_array_equal(np.asarray(first_argmax(x)), np.argmax(x, axis=-1))
    y = rng.normal(size=(2, 3, 50)).astype(np.float32)  # any leading axes
    np.testing.assert_array_equal(np.asarray(jax.jit(first_argmax)(y)), np.argmax(y, axis=-1))


def test_warpers_match_transformers():
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    logits = np.random.default_rng(0).normal(size=(3, 50)).astype(np.float32) * 3
    for temperature, top_k, top_p in [(0.7, None, None), (1.0, 5, None), (1.3, None, 0.8), (0.9, 10, 0.6),
                                      (1.0, 1, None), (1.0, None, 1e-3)]:
        scores = torch.tensor(logits)
        scores = TemperatureLogitsWarper(temperature)(None, scores)
        if top_k is not None:
            scores = TopKLogitsWarper(top_k)(None, scores)
        if top_p is not None:
            scores = TopPLogitsWarper(top_p)(None, scores)
        expected = scores.numpy()
        got = np.asarray(warp_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p))
        np.testing.assert_array_equal(np.isinf(got), np.isinf(expected), err_msg=f"{temperature, top_k, top_p}")
        finite = np.isfinite(expected)
        np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-6)


def test_sampler_draws_from_the_warped_distribution():
    logits = np.array([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]], np.float32)
    n = 20000
    keys = jax.random.split(jax.random.key(0), n)
    draws = np.asarray(jax.vmap(lambda k: sample_logits(logits, k, do_sample=True, temperature=0.8, top_k=4,
                                                        top_p=None)[0])(keys))
    # numpy reference: softmax(logits / 0.8) over the 4 largest
    z = np.exp(logits[0] / 0.8)
    z[np.argsort(logits[0])[:-4]] = 0
    expected = z / z.sum()
    freq = np.bincount(draws, minlength=6) / n
    np.testing.assert_allclose(freq, expected, atol=0.015)


def test_sampling_is_reproducible_and_top_k_1_is_greedy(lively_opt_dir):
    model = rj.load(lively_opt_dir)
    ids, mask = padded_prompts(LENGTHS)
    kw = dict(max_new_tokens=NEW, do_sample=True, temperature=1.5, top_p=0.95, eos_token_id=())
    a = model.generate(ids, mask, rng=jax.random.key(1), **kw)
    b = model.generate(ids, mask, rng=jax.random.key(1), **kw)
    c = model.generate(ids, mask, rng=jax.random.key(2), **kw)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    greedy = model.generate(ids, mask, max_new_tokens=NEW)
    top1 = model.generate(ids, mask, max_new_tokens=NEW, do_sample=True, top_k=1, rng=jax.random.key(3))
    np.testing.assert_array_equal(top1, greedy)


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("kwargs, ids_mask, match", [
    (dict(max_new_tokens=45), None, "exceeds the model's 48 positions"),
    (dict(max_new_tokens=5, max_len=8), None, "max_len 8 is too short"),
    (dict(max_new_tokens=5, max_len=100), None, "max_len 100 exceeds"),
    (dict(max_new_tokens=0), None, "max_new_tokens must be an integer >= 1"),
    (dict(max_new_tokens=2), (np.zeros((0, 4), np.int64), None), "empty"),
    (dict(max_new_tokens=2), (np.full((2, 4), 5), np.array([[1, 0, 1, 1], [1, 1, 1, 1]])), "not contiguous"),
    (dict(max_new_tokens=2), (np.full((2, 4), 5), np.array([[0, 0, 0, 0], [1, 1, 1, 1]])), "no tokens"),
    (dict(max_new_tokens=2), (np.full((2, 4), 5), np.ones((2, 3))), "attention_mask has shape"),
    (dict(max_new_tokens=2, do_sample=True), None, "PRNG key"),
    (dict(max_new_tokens=2, do_sample=True, rng=jax.random.key(0), temperature=0.0), None, "temperature"),
    (dict(max_new_tokens=2, do_sample=True, rng=jax.random.key(0), top_k=0), None, "top_k"),
    (dict(max_new_tokens=2, do_sample=True, rng=jax.random.key(0), top_p=1.5), None, "top_p"),
    (dict(max_new_tokens=2, do_sample=True, rng=jax.random.key(0), top_p=0.0), None, "top_p"),
    (dict(max_new_tokens=2, do_sample=True, rng=np.zeros(3)), None, "PRNG key"),
])
def test_bad_input_is_a_value_error(tiny_opt_dir, kwargs, ids_mask, match):
    model = rj.load(tiny_opt_dir)
    ids, mask = ids_mask if ids_mask is not None else padded_prompts([6, 4])
    with pytest.raises(ValueError, match=match):
        model.generate(ids, mask, **kwargs)


def test_generate_needs_a_decoder(tiny_vit_cls_dir):
    with pytest.raises(ValueError, match="language model"):
        rj.load(tiny_vit_cls_dir).generate(np.ones((1, 3), np.int64), max_new_tokens=2)
