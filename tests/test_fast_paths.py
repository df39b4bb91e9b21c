"""The inference fast paths against independent references (tiny shapes).

* the per-layer pool layout and per-layer KV caches (unrolled layers, generate's
  default) against the stacked pool scanned with ``lax.scan`` and the stacked cache,
  for several families (learned positions, GQA + RoPE, sliding windows + soft-cap,
  q/k norms): forward logits and statistics, greedy tokens and decode logits;
* every attention implementation against a NumPy loop over batch, head and query
  (GQA, sliding-window and padding masks, Gemma 2's soft-cap, ``self_kv``, rows
  that see nothing);
* the aligned checkpoint reads that streaming hands to XLA without a copy.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import radial_jax as rj
from radial_jax.serving.generation import _generate_core
from radial_jax.models.kv_cache import KVCache, split_layers, stack_layers
from radial_jax.models import attention as attention_mod
from radial_jax.models import attention_blocks
from radial_jax.models.attention import IMPLEMENTATIONS, attend, choose_implementation
from radial_jax.models.stack import pool_layer, stack_pool, unstack_pool

FAMILIES = {
    "opt": rj.OPTConfig(vocab_size=96, hidden_size=32, num_hidden_layers=3, ffn_dim=48, num_attention_heads=4,
                        max_position_embeddings=64),
    "llama_gqa": rj.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                pad_token_id=0),
    "gemma2_window_softcap": rj.GemmaConfig(
        model_type="gemma2", vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=3,
        max_position_embeddings=64, attn_logit_softcapping=5.0, final_logit_softcapping=30.0,
        tie_word_embeddings=False),
    "qwen3_qk_norm": rj.QwenConfig(model_type="qwen3", vocab_size=96, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                                   max_position_embeddings=64, pad_token_id=0),
}


def perturbed(config, seed=0):
    """A random model with weights large enough that greedy tokens vary (a real test of decoding)."""
    model = rj.build(config, seed=seed)
    leaves, tree = jax.tree_util.tree_flatten(model.params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [a + 0.3 * jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys)]
    return rj.Model(config, jax.tree_util.tree_unflatten(tree, leaves))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_per_layer_layout_equals_stacked_scan(family):
    stacked = perturbed(FAMILIES[family])
    flat = stacked.with_layout("per_layer")
    assert flat.layout == "per_layer" and stacked.layout == "stacked"
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 96, (2, 9))
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding
    a, b = stacked.forward(ids, mask), flat.forward(ids, mask)
    np.testing.assert_allclose(np.asarray(b.logits), np.asarray(a.logits), rtol=1e-5, atol=1e-5)
    for x, y in zip(jax.tree_util.tree_leaves(a.stats), jax.tree_util.tree_leaves(b.stats)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)
    # round trip of the layout
    back = flat.with_layout("stacked")
    for x, y in zip(jax.tree_util.tree_leaves(stacked.params), jax.tree_util.tree_leaves(back.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _decode_stacked(model, ids_bt, lengths_b, n, cache_len):
    """generate's compiled loop with the pre-fast-path layout: stacked pool (scan) and stacked cache."""
    dec = dataclasses.replace(model.decoding(), prepare=lambda p: p, init_cache=model.module.init_cache)
    return _generate_core(dec, model.params, jnp.asarray(ids_bt, jnp.int32), jnp.asarray(lengths_b, jnp.int32),
                          jax.random.key(0), jnp.float32(1), None, jnp.asarray([-1], jnp.int32), jnp.int32(0),
                          max_new_tokens=n, cache_len=cache_len, do_sample=False, top_k=None, output_logits=True)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fast_decode_equals_stacked_decode_and_full_forward(family):
    model = perturbed(FAMILIES[family], seed=3)
    rng = np.random.default_rng(1)
    lengths, n = np.array([5, 2, 7]), 6
    ids = np.zeros((3, 7), np.int64)
    for row, length in enumerate(lengths):
        ids[row, :length] = rng.integers(3, 96, length)
    mask = (np.arange(7)[None] < lengths[:, None]).astype(np.int64)
    fast = model.generate(ids, mask, max_new_tokens=n, eos_token_id=(), output_logits=True)
    for m in (model, model.with_layout("per_layer")):  # generate converts a stacked pool itself
        again = m.generate(ids, mask, max_new_tokens=n, eos_token_id=(), output_logits=True)
        np.testing.assert_array_equal(again.new_tokens, fast.new_tokens)
    tokens, _, _, logits, *_ = _decode_stacked(model, ids, lengths, n, 7 + n)
    np.testing.assert_array_equal(fast.new_tokens, np.asarray(tokens))
    np.testing.assert_allclose(fast.logits, np.asarray(logits), rtol=1e-4, atol=1e-4)
    assert len(np.unique(fast.new_tokens)) > 2  # not a degenerate constant output
    # every decoded token's logits equal the uncached forward of the whole sequence (row 0, no padding)
    seq = np.concatenate([ids[:1, :lengths[0]], fast.new_tokens[:1, :-1]], axis=1)
    full = np.asarray(model(seq))[0, lengths[0] - 1:]
    np.testing.assert_allclose(fast.logits[0], full, rtol=1e-4, atol=1e-4)


def test_per_layer_cache_round_trip_and_pool_helpers():
    cache = KVCache.create(3, 2, 5, 2, 4)
    cache = cache.replace(k=jax.random.normal(jax.random.key(0), cache.k.shape))
    parts = split_layers(cache)
    assert len(parts) == 3 and parts[1].k.shape == (1, 2, 2, 5, 4) and parts[1].max_len == 5
    for x, y in zip(jax.tree_util.tree_leaves(stack_layers(parts)), jax.tree_util.tree_leaves(cache)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    pool = {"w": jnp.arange(12.0).reshape(3, 4)}
    layers = unstack_pool(pool)
    np.testing.assert_array_equal(np.asarray(pool_layer(layers, 2)["w"]), np.asarray(pool_layer(pool, 2)["w"]))
    np.testing.assert_array_equal(np.asarray(stack_pool(layers)["w"]), np.asarray(pool["w"]))
    with pytest.raises(ValueError, match="Python int"):
        jax.jit(lambda i: pool_layer(layers, i)["w"])(1)
    with pytest.raises(ValueError, match="allowed"):
        rj.build(FAMILIES["opt"]).with_layout("flat")


# --------------------------------------------------------------------------- attention

def numpy_attention(q, k, v, mask, scale, softcap=None, self_kv=None):
    """One query, one head at a time; keys ``[b, g, k, d]``; head ``h`` reads kv head ``h // (H / G)``."""
    b, nq, h, d = q.shape
    g = k.shape[1]
    out = np.zeros((b, nq, h, d))
    for bi in range(b):
        for hi in range(h):
            gi = hi // (h // g)
            for qi in range(nq):
                s = k[bi, gi] @ q[bi, qi, hi] * scale
                vals = v[bi, gi]
                if softcap is not None:
                    s = np.tanh(s / softcap) * softcap
                keep = mask[bi, qi].copy()
                if self_kv is not None:
                    ks, vs = self_kv
                    s_self = ks[bi, qi, gi] @ q[bi, qi, hi] * scale
                    s = np.append(s, np.tanh(s_self / softcap) * softcap if softcap is not None else s_self)
                    vals = np.concatenate([vals, vs[bi, qi, gi][None]])
                    keep = np.append(keep, True)
                if not keep.any():
                    continue  # a query that sees nothing: zeros
                w = np.exp(s[keep] - s[keep].max())
                out[bi, qi, hi] = (w / w.sum()) @ vals[keep]
    return out


def attention_case(seed=0, b=2, nq=5, nk=7, h=4, g=2, d=8):
    rng = np.random.default_rng(seed)
    q, k, v = rng.normal(size=(b, nq, h, d)), rng.normal(size=(b, g, nk, d)), rng.normal(size=(b, g, nk, d))
    slots_q = np.array([[2, 3, 4, 5, 6], [0, 1, 2, 3, 6]])[:, :nq]
    j = np.arange(nk)
    window = 3
    mask = (j[None, None] <= slots_q[..., None]) & (slots_q[..., None] - j[None, None] < window)
    mask[1, :, 5:] = False  # padding keys of row 1
    mask[0, 1] = False  # a query that sees nothing
    self_kv = rng.normal(size=(b, nq, g, d)), rng.normal(size=(b, nq, g, d))
    return q, k, v, mask, self_kv


def several_tiles(monkeypatch, slots: int, items: int):
    """``"tiled"`` with blocks of 2 queries (the last one short) and a score budget that holds ``items`` (row, kv
    head) items per ``lax.map`` iteration, each 2 queries x 2 query heads x ``slots`` read slots of float32."""
    monkeypatch.setattr(attention_blocks, "BLOCK", 2)
    monkeypatch.setattr(attention_blocks, "BLOCK_SCORE_BYTES", 4 * 2 * 2 * slots * items)


@pytest.mark.parametrize("impl", ["xla", "reference", "chunked", "tiled", "compact"])
@pytest.mark.parametrize("features", ["plain", "softcap", "self_kv", "softcap_self_kv"])
def test_attention_implementations_equal_numpy(impl, features, monkeypatch):
    monkeypatch.setattr(attention_mod, "CHUNK", 2)  # several blocks, the last one padded
    monkeypatch.setattr(attention_blocks, "COMPACT_CHUNK", 2)  # "compact": several chunks of seen keys
    several_tiles(monkeypatch, slots=7, items=3)  # 2 rows x 2 kv heads: one full iteration and a remainder of 1
    q, k, v, mask, self_kv = attention_case()
    softcap = 2.0 if "softcap" in features else None
    skv = self_kv if "self_kv" in features else None
    scale = 0.3
    want = numpy_attention(q, k, v, mask, scale, softcap, skv)
    args = [jnp.asarray(a, jnp.float32) for a in (q, k, v)] + [jnp.asarray(mask)]
    skv_j = None if skv is None else tuple(jnp.asarray(a, jnp.float32) for a in skv)
    if impl == "xla" and features != "plain":
        with pytest.raises(ValueError, match="soft-cap or self_kv"):
            attend(*args, scale=scale, softcap=softcap, self_kv=skv_j, implementation=impl)
        return
    got = jax.jit(lambda *a: attend(*a, scale=scale, softcap=softcap, self_kv=skv_j, implementation=impl))(*args)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)
    if skv is None:
        assert np.all(np.asarray(got)[0, 1] == 0)  # sees nothing -> zeros


def prompt_case(seed=0, b=3, nq=7, nk=9, h=4, g=2, d=8):
    """Queries at slots ``0 .. nq - 1`` of a longer memory: causal, a window, padding, a row that sees nothing."""
    rng = np.random.default_rng(seed)
    q, k, v = rng.normal(size=(b, nq, h, d)), rng.normal(size=(b, g, nk, d)), rng.normal(size=(b, g, nk, d))
    i, j = np.arange(nq)[:, None], np.arange(nk)[None, :]
    mask = np.broadcast_to((j <= i) & (i - j < 4), (b, nq, nk)).copy()
    mask[1, :, 5:] = False  # row 1: a 5-token prompt, right-padded
    mask[2, 3] = False  # a query that sees nothing
    return q, k, v, mask


@pytest.mark.parametrize("features", ["plain", "softcap", "self_kv"])
def test_tiles_in_causal_blocks_equal_numpy_and_the_reference_gradient(features, monkeypatch):
    several_tiles(monkeypatch, slots=7, items=4)  # 3 rows x 2 kv heads: one full iteration and a remainder of 2
    q, k, v, mask = prompt_case()
    softcap = 2.0 if features == "softcap" else None
    rng = np.random.default_rng(2)
    self_kv = (rng.normal(size=(3, 7, 2, 8)), rng.normal(size=(3, 7, 2, 8))) if features == "self_kv" else None
    scale = 0.3
    args = [jnp.asarray(a, jnp.float32) for a in (q, k, v)]
    skv = None if self_kv is None else tuple(jnp.asarray(a, jnp.float32) for a in self_kv)

    def run(impl, q, k, v):
        return attend(q, k, v, jnp.asarray(mask), scale=scale, softcap=softcap, self_kv=skv, causal_blocks=True,
                      implementation=impl)

    got = jax.jit(lambda *a: run("tiled", *a))(*args)
    want = numpy_attention(q, k, v, mask, scale, softcap, self_kv)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)
    if self_kv is None:
        assert np.all(np.asarray(got)[2, 3] == 0)  # sees nothing -> zeros
    cotangent = jnp.asarray(rng.normal(size=got.shape), jnp.float32)

    def grads(impl):
        return jax.grad(lambda *a: jnp.sum(run(impl, *a) * cotangent), argnums=(0, 1, 2))(*args)

    for g_tiled, g_ref in zip(grads("tiled"), grads("reference")):
        np.testing.assert_allclose(np.asarray(g_tiled), np.asarray(g_ref), rtol=1e-4, atol=1e-5)


def sparse_memory_case(seed=3, b=3, nq=6, nk=16, h=4, g=2, d=8):
    """A Radial Network layer's cache: few written slots, queries in slot order, causal; row 2 holds one query
    that sees nothing and padding queries (slot past the memory) that see nothing either."""
    rng = np.random.default_rng(seed)
    q, k, v = rng.normal(size=(b, nq, h, d)), rng.normal(size=(b, g, nk, d)), rng.normal(size=(b, g, nk, d))
    written = rng.random((b, nk)) < 0.3
    written[0, [1, 14]] = True  # row 0 reaches the last chunk
    slots = np.sort([rng.choice(nk, nq, replace=False) for _ in range(b)], axis=1)
    slots[2, 3:] = nk  # padding queries
    j = np.arange(nk)
    mask = written[:, None, :] & (j[None, None] < slots[..., None]) & (slots < nk)[..., None]
    mask[2, 0] = False
    return q, k, v, mask


@pytest.mark.parametrize("features", ["plain", "softcap", "self_kv"])
def test_compact_attention_equals_numpy_and_the_reference_gradient_on_a_sparse_memory(features, monkeypatch):
    """``"compact"`` reads the keys some query sees in chunks of 2, in blocks of 2 queries that stop at the chunk
    of their last seen key: the values of the NumPy loop, the gradient of the reference."""
    monkeypatch.setattr(attention_blocks, "COMPACT_CHUNK", 2)
    monkeypatch.setattr(attention_blocks, "BLOCK", 2)
    q, k, v, mask = sparse_memory_case()
    assert mask.any(1).sum(-1).max() <= 8 < 16, "some chunks must be skipped"
    softcap = 2.0 if features == "softcap" else None
    rng = np.random.default_rng(4)
    self_kv = (rng.normal(size=(3, 6, 2, 8)), rng.normal(size=(3, 6, 2, 8))) if features == "self_kv" else None
    args = [jnp.asarray(a, jnp.float32) for a in (q, k, v)]
    skv = None if self_kv is None else tuple(jnp.asarray(a, jnp.float32) for a in self_kv)

    def run(impl, q, k, v):
        return attend(q, k, v, jnp.asarray(mask), scale=0.3, softcap=softcap, self_kv=skv, implementation=impl)

    got = jax.jit(lambda *a: run("compact", *a))(*args)
    np.testing.assert_allclose(np.asarray(got), numpy_attention(q, k, v, mask, 0.3, softcap, self_kv),
                               rtol=2e-5, atol=2e-5)
    if self_kv is None:
        assert np.all(np.asarray(got)[2, [0, 3, 4, 5]] == 0)  # sees nothing -> zeros
    cotangent = jnp.asarray(rng.normal(size=got.shape), jnp.float32)

    def grads(impl):
        return jax.grad(lambda *a: jnp.sum(run(impl, *a) * cotangent), argnums=(0, 1, 2))(*args)

    for g_compact, g_ref in zip(grads("compact"), grads("reference")):
        assert np.all(np.isfinite(np.asarray(g_compact)))
        np.testing.assert_allclose(np.asarray(g_compact), np.asarray(g_ref), rtol=1e-4, atol=1e-5)


def test_causal_blocks_need_a_slot_per_query():
    q, k, v, mask = (jnp.asarray(a) for a in prompt_case())
    with pytest.raises(ValueError, match="7 queries need at least as many slots, got 5"):
        attend(q, k[:, :, :5], v[:, :, :5], mask[..., :5], causal_blocks=True)


def test_attention_choice_per_backend():
    bf16, f32 = jnp.bfloat16, jnp.float32
    assert choose_implementation(64, 64, f32, backend="cpu") == "xla"
    assert choose_implementation(64, 64, f32, softcap=5.0, backend="cpu") == "reference"
    assert choose_implementation(64, 64, jnp.float16, backend="cpu") == "reference"
    blocks = attention_blocks.BLOCK
    assert choose_implementation(blocks, 512, f32, backend="cpu") == "xla"  # one block of queries
    assert choose_implementation(1, 512, f32, backend="cpu") == "reference"  # a decode step: one query
    for features in (dict(), dict(softcap=5.0), dict(self_kv=True)):  # more: tiles, on any features
        assert choose_implementation(blocks + 1, 512, f32, backend="cpu", **features) == "tiled"
    assert choose_implementation(blocks + 1, 512, bf16, backend="cpu") == "tiled"  # in float32, as the reference
    assert choose_implementation(4096, 4096, bf16, backend="gpu") == "cudnn"
    assert choose_implementation(4096, 4096, bf16, head_dim=256, backend="gpu") == "chunked"  # Gemma's 256
    assert choose_implementation(1, 4096, bf16, backend="gpu") == "xla"  # decode step: one query
    assert choose_implementation(4096, 4096, f32, backend="gpu") == "chunked"  # no fp32 [T, T] scores
    assert choose_implementation(4096, 4096, bf16, softcap=50.0, backend="gpu") == "chunked"
    assert choose_implementation(4096, 4096, bf16, backend="tpu") == "chunked"
    assert choose_implementation(256, 256, bf16, self_kv=True, backend="tpu") == "reference"
    chunk = attention_blocks.COMPACT_CHUNK  # a sparse memory (the caller's hint): compact it when it spans chunks
    assert choose_implementation(4, chunk + 1, f32, self_kv=True, sparse_keys=True, backend="cpu") == "compact"
    assert choose_implementation(blocks + 1, chunk, f32, sparse_keys=True, backend="cpu") == "tiled"
    assert choose_implementation(4096, 4096, bf16, sparse_keys=True, backend="gpu") == "cudnn"  # CPU only
    assert set(IMPLEMENTATIONS) == {"xla", "cudnn", "chunked", "tiled", "compact", "reference"}
    with pytest.raises(ValueError, match="unknown"):
        attend(jnp.zeros((1, 1, 2, 4)), jnp.zeros((1, 2, 3, 4)), jnp.zeros((1, 2, 3, 4)), jnp.ones((1, 1, 3), bool),
               implementation="flash")


# --------------------------------------------------------------------------- streaming reads

def test_tensor_reads_are_aligned_and_used_by_xla_in_place(tmp_path):
    from safetensors.numpy import save_file
    from radial_jax.checkpoints.tensor_files import ALIGN, safetensors_tensors
    from radial_jax.profiling.streaming import host_to_device
    data = np.arange(1000, dtype=np.float32)
    save_file({"w": data}, str(tmp_path / "t.safetensors"))
    got = safetensors_tensors(tmp_path / "t.safetensors")["w"]()
    np.testing.assert_array_equal(got, data)
    assert got.ctypes.data % ALIGN == 0
    dev = host_to_device({"w": got})["w"]
    np.testing.assert_array_equal(np.asarray(dev), data)
    if jax.default_backend() == "cpu":  # no second copy of the tensor
        assert dev.unsafe_buffer_pointer() == got.ctypes.data
