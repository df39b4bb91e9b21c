"""Logits parity with transformers (PyTorch) on tiny random checkpoints, fp32, <= 1e-4."""
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, ViTForImageClassification, ViTModel

import radial_jax as rj
from conftest import OPT_VARIANTS

TOL = 1e-4


def left_padded_batch(vocab: int, lengths, seed: int = 0):
    rng = np.random.default_rng(seed)
    t = max(lengths)
    ids = np.ones((len(lengths), t), np.int64)  # pad id 1
    mask = np.zeros((len(lengths), t), np.int64)
    for row, n in enumerate(lengths):
        ids[row, t - n:] = rng.integers(3, vocab, n)
        mask[row, t - n:] = 1
    return ids, mask


@pytest.mark.parametrize("variant", sorted(OPT_VARIANTS))
def test_opt_logits_match_transformers(tiny_opt_variants, variant):
    path = tiny_opt_variants[variant]
    ours = rj.load(path)
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    ids, mask = left_padded_batch(ours.config.vocab_size, [9, 5, 1])
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    got = np.asarray(ours(ids, mask))
    valid = mask.astype(bool)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got[valid], expected[valid], atol=TOL, rtol=0)


def test_opt_without_mask_matches(tiny_opt_dir):
    ours = rj.load(tiny_opt_dir)
    ref = AutoModelForCausalLM.from_pretrained(tiny_opt_dir).eval()
    ids = np.random.default_rng(1).integers(0, ours.config.vocab_size, (2, 12))
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(ids)), expected, atol=TOL, rtol=0)


def test_vit_classifier_logits_match(tiny_vit_cls_dir):
    ours = rj.load(tiny_vit_cls_dir)
    ref = ViTForImageClassification.from_pretrained(tiny_vit_cls_dir).eval()
    pixels = np.random.default_rng(2).normal(size=(3, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        expected = ref(pixel_values=torch.tensor(pixels)).logits.numpy()
    got = np.asarray(ours(pixels))
    assert got.shape == (3, 5)
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


def test_vit_encoder_hidden_and_pooler_match(tiny_vit_dir):
    ours = rj.load(tiny_vit_dir)
    ref = ViTModel.from_pretrained(tiny_vit_dir).eval()
    pixels = np.random.default_rng(3).normal(size=(2, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        expected = ref(pixel_values=torch.tensor(pixels))
    out = ours.forward(pixels)
    np.testing.assert_allclose(np.asarray(out.hidden), expected.last_hidden_state.numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(out.pooled), expected.pooler_output.numpy(), atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="no classification head"):
        ours(pixels)


def test_the_few_token_tied_head_computes_the_matmul_head():
    """A decode step's tied LM head (2 to 16 tokens on CPU: a product summed over the embedding axis) against
    NumPy's ``hidden @ table.T``, at both ends of the range and with leading axes; 1 and 17 tokens keep the
    matmul."""
    from radial_jax.models.decoder import FEW_TOKENS, few_token_head, tied_head_few_tokens
    import jax.numpy as jnp
    rng = np.random.default_rng(0)
    table = rng.normal(size=(300, 24)).astype(np.float32)
    for shape in [(2,), (FEW_TOKENS[1],), (2, 3, 1), (4, 2)]:
        hidden = rng.normal(size=shape + (24,)).astype(np.float32)
        assert few_token_head(hidden)
        got = np.asarray(tied_head_few_tokens(jnp.asarray(hidden), jnp.asarray(table), jnp.float32))
        np.testing.assert_allclose(got, hidden @ table.T, rtol=1e-5, atol=1e-4)
    assert not few_token_head(np.zeros((1, 24))) and not few_token_head(np.zeros((FEW_TOKENS[1] + 1, 24)))
