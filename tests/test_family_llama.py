"""Llama (2, 3, 3.1+), Mistral, Qwen2/2.5 and Qwen3 against transformers (PyTorch), fp32.

Tiny random checkpoints written by transformers' ``save_pretrained`` (one per
family and quirk), perturbed away from their init so that every tensor's mapping
matters, are the reference: our loader reads the files, and transformers reads
the same files. Checked: logits (left-padded and unpadded batches, sequences
longer than the sliding windows), greedy generation past the windows, residual
ratios against forward hooks, the older hub config format (``rope_theta`` +
``rope_scaling``, no ``layer_types``) and clear errors for unsupported settings.
"""
import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest
import torch
from transformers import (AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import radial_jax as rj
from conftest import perturb_
from radial_jax.models.rope import RoPE
from test_profiling import check_against_hooks, hf_block_ratios

TOL = 1e-4
PAD, BOS, EOS = 0, 1, 2
WINDOW = 5  # sliding window, shorter than every test sequence
BASE = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, max_position_embeddings=64, pad_token_id=PAD, bos_token_id=BOS,
            eos_token_id=EOS, attention_dropout=0.0)

# name -> (transformers config class, overrides): one checkpoint per family and quirk
VARIANTS = {
    "llama_gqa_untied": (LlamaConfig, dict(num_hidden_layers=3)),
    "llama_tied_mha": (LlamaConfig, dict(tie_word_embeddings=True, num_key_value_heads=4)),
    "llama3_rope_biases_head_dim": (LlamaConfig, dict(
        rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=4.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=32),
        attention_bias=True, mlp_bias=True, head_dim=16, eos_token_id=[EOS, 7])),
    "mistral_window": (MistralConfig, dict(sliding_window=WINDOW, num_hidden_layers=3)),
    "qwen2_tied": (Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen2_window_upper_layers": (Qwen2Config, dict(use_sliding_window=True, sliding_window=WINDOW,
                                                    max_window_layers=1, num_hidden_layers=3)),
    "qwen3_qk_norm_head_dim_bias": (Qwen3Config, dict(head_dim=16, attention_bias=True)),
}
WINDOWED = ["mistral_window", "qwen2_window_upper_layers"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """name -> checkpoint directory (transformers >= 5 format, as ``save_pretrained`` writes it)."""
    root = tmp_path_factory.mktemp("llama_family")
    dirs = {}
    for seed, (name, (cls, overrides)) in enumerate(VARIANTS.items()):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cls(**{**BASE, **overrides}))
        # strong enough that greedy decoding does not repeat one token, small enough for 1e-4 in fp32
        perturb_(model, seed, scale=0.2).eval().save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


_REFS, _OURS = {}, {}


def reference(path):
    """transformers' model read from the same files (eager attention: the plain reference)."""
    if str(path) not in _REFS:
        _REFS[str(path)] = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    return _REFS[str(path)]


def ours(path):
    if str(path) not in _OURS:
        _OURS[str(path)] = rj.load(path)
    return _OURS[str(path)]


def left_padded(lengths, seed=0, vocab=BASE["vocab_size"]):
    rng = np.random.default_rng(seed)
    t = max(lengths)
    ids = np.full((len(lengths), t), PAD, np.int64)
    mask = np.zeros((len(lengths), t), np.int64)
    for row, n in enumerate(lengths):
        ids[row, t - n:] = rng.integers(3, vocab, n)
        mask[row, t - n:] = 1
    return ids, mask


def hf_logits(path, ids, mask):
    """transformers' logits with explicit positions counted over the real tokens, as ours are."""
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        return reference(path)(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                               position_ids=torch.tensor(positions)).logits.numpy()


def hf_head_dim(ref_config):
    return getattr(ref_config, "head_dim", None) or ref_config.hidden_size // ref_config.num_attention_heads


def assert_logits_match(path, ids, mask):
    expected = hf_logits(path, ids, mask)
    got = np.asarray(ours(path)(ids, mask))
    valid = mask.astype(bool)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got[valid], expected[valid], atol=TOL, rtol=0)
    return got


# ------------------------------------------------------------------ configs read as transformers reads them

@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_config_is_the_checkpoint_architecture(ckpts, name):
    cfg, ref = ours(ckpts[name]).config, reference(ckpts[name]).config
    lc = cfg.layer_config()
    assert cfg.model_type == ref.model_type and cfg.num_layers == ref.num_hidden_layers
    assert lc.head_size == hf_head_dim(ref) and lc.kv_heads == ref.num_key_value_heads
    assert cfg.decoder_spec().tie_embeddings == ref.tie_word_embeddings
    sliding = getattr(ref, "layer_types", None) or (["sliding_attention"] * ref.num_hidden_layers
                                                    if getattr(ref, "sliding_window", None) else [])
    want = [ref.sliding_window if kind == "sliding_attention" else 0 for kind in sliding] or [0] * cfg.num_layers
    np.testing.assert_array_equal(cfg.layer_meta()["window"], want)
    # our inverse frequencies are transformers' own (llama3 scaling included)
    rope = ref.rope_parameters["rope_type"]
    init = (ROPE_INIT_FUNCTIONS[rope] if rope != "default"
            else type(reference(ckpts[name]).model.rotary_emb).compute_default_rope_parameters)
    np.testing.assert_allclose(cfg.rope_parameters.inv_freq(lc.head_size), init(ref)[0].numpy(), rtol=1e-6)
    # a config saved as JSON (``dataclasses.asdict``, as training artifacts do) comes back equal
    assert type(cfg)(**json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg
    hash(cfg)


# transformers without the sliding windows: the window must change the logits of the test sequences
FULL_ATTENTION = {"mistral_window": dict(sliding_window=None),
                  "qwen2_window_upper_layers": dict(use_sliding_window=False, layer_types=["full_attention"] * 3)}


def test_variants_exercise_their_quirks(ckpts):
    """The comparisons below would not notice a dropped quirk unless it changes the numbers."""
    windows = {n: ours(ckpts[n]).config.layer_meta()["window"].tolist() for n in WINDOWED}
    assert windows == {"mistral_window": [WINDOW] * 3, "qwen2_window_upper_layers": [0, WINDOW, WINDOW]}
    for name, overrides in FULL_ATTENTION.items():
        full = AutoModelForCausalLM.from_pretrained(ckpts[name], attn_implementation="eager", **overrides).eval()
        ids, mask = left_padded(LENGTHS, seed=1)
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        with torch.no_grad():
            without = full(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                           position_ids=torch.tensor(positions)).logits.numpy()
        windowed = hf_logits(ckpts[name], ids, mask)
        assert np.abs(without - windowed)[mask.astype(bool)].max() > 1e-2
    rope = ours(ckpts["llama3_rope_biases_head_dim"]).config.rope_parameters
    scaled, plain = rope.inv_freq(16), RoPE(theta=rope.theta).inv_freq(16)
    # wavelengths 6.3 (kept: shorter than 32 / 4), 19.9 (smoothed: between), 62.8 and longer (divided by 4)
    assert scaled[0] == plain[0] and plain[1] / 4 < scaled[1] < plain[1]
    np.testing.assert_allclose(scaled[2:], plain[2:] / 4, rtol=1e-6)
    params = ours(ckpts["qwen3_qk_norm_head_dim_bias"]).params["layers"]
    assert params["q_norm"]["scale"].shape == (2, 16) and "bias" in params["out_proj"]
    assert "bias" in ours(ckpts["qwen2_tied"]).params["layers"]["q_proj"]
    assert "bias" not in ours(ckpts["qwen2_tied"]).params["layers"]["out_proj"]
    assert "lm_head" not in ours(ckpts["qwen2_tied"]).params and "lm_head" in ours(ckpts["llama_gqa_untied"]).params


# ------------------------------------------------------------------ 1. logits
# Every forward in this file has the shape [4, 19] with a mask: one compilation per checkpoint.

LENGTHS = [19, 12, 5, 1]  # left-padded rows of different lengths, longer than the window of 5


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_left_padded_logits_equal_transformers(ckpts, name):
    ids, mask = left_padded(LENGTHS, seed=1)
    assert_logits_match(ckpts[name], ids, mask)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_unpadded_logits_equal_transformers(ckpts, name):
    ids = np.random.default_rng(2).integers(0, BASE["vocab_size"], (len(LENGTHS), max(LENGTHS)))
    assert_logits_match(ckpts[name], ids, np.ones_like(ids))


# ------------------------------------------------------------------ 2. greedy generation

PROMPTS = [7, 3, 1, 5]
NEW = 12  # prompts + new tokens (19) run well past the window of 5
# one generation compile each (the slowest part of this file); the tied heads decode like the untied ones
# through the same ``logits`` method their forward tests cover
GENERATING = ["llama_gqa_untied", "llama3_rope_biases_head_dim", "mistral_window", "qwen2_window_upper_layers",
              "qwen3_qk_norm_head_dim_bias"]
_GENERATED = {}


def generated(path):
    """``(ids, mask, GenerationOutput)``: our greedy generation, once per checkpoint (one compilation)."""
    if str(path) not in _GENERATED:
        ids, mask = left_padded(PROMPTS, seed=4)
        _GENERATED[str(path)] = ids, mask, ours(path).generate(ids, mask, max_new_tokens=NEW, output_logits=True)
    return _GENERATED[str(path)]


def hf_generate(path, ids, mask):
    with torch.no_grad():
        return reference(path).generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                        do_sample=False, max_new_tokens=NEW, pad_token_id=PAD).numpy()


@pytest.mark.parametrize("name", GENERATING)
def test_greedy_generation_equals_transformers(ckpts, name):
    ids, mask, out = generated(ckpts[name])
    expected = hf_generate(ckpts[name], ids, mask)
    assert out.sequences.shape == (len(PROMPTS), max(PROMPTS) + NEW)
    # transformers stops the batch when every row has hit EOS; what follows in ours must be padding
    np.testing.assert_array_equal(out.sequences[:, :expected.shape[1]], expected)
    assert (out.sequences[:, expected.shape[1]:] == PAD).all()
    assert len(np.unique(out.new_tokens)) > 3  # not trivially a repeated token


@pytest.mark.parametrize("name", GENERATING)
def test_cached_decoding_past_the_sliding_window_equals_the_parallel_forward(ckpts, name):
    ids, mask, out = generated(ckpts[name])
    full_mask = np.concatenate([mask, np.ones((len(PROMPTS), NEW), np.int64)], axis=1)
    full = assert_logits_match(ckpts[name], out.sequences, full_mask)  # parallel forward == transformers'
    t = max(PROMPTS)
    for row, n in enumerate(out.num_new):  # the steps each row decoded (a row stops after EOS)
        np.testing.assert_allclose(out.logits[row, :n], full[row, t - 1:t - 1 + n], atol=1e-5, rtol=0)
    assert out.num_new.max() == NEW and (out.prompt_lengths + out.num_new > WINDOW).all()


# ------------------------------------------------------------------ 3. residual ratios

@pytest.mark.parametrize("name", ["llama_gqa_untied", "qwen2_window_upper_layers", "qwen3_qk_norm_head_dim_bias"])
def test_residual_ratios_equal_transformers_hooks(ckpts, name):
    model, ref = ours(ckpts[name]), reference(ckpts[name])
    ids, mask = left_padded(LENGTHS, seed=6)
    result = rj.profile(model, [(ids, mask)], keep_raw=True, progress=False)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    hooks = hf_block_ratios(ref.model.layers, lambda: ref(input_ids=torch.tensor(ids),
                                                          attention_mask=torch.tensor(mask),
                                                          position_ids=torch.tensor(positions)),
                            post_ln=False, attn_name="self_attn", mlp_name="mlp")
    check_against_hooks(result, hooks, mask.astype(bool))
    assert result.tokens == mask.sum()


# ------------------------------------------------------------------ 4. the older hub config format

def to_hub_format(cfg: dict) -> dict:
    """A transformers >= 5 config.json as older hub checkpoints write it: ``rope_theta`` + ``rope_scaling``
    (``type`` or ``rope_type``), no ``layer_types``, Qwen2.5's unused ``sliding_window``."""
    cfg = dict(cfg)
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type")
    rope.pop("type", None)
    cfg["rope_scaling"] = None if kind == "default" else {("rope_type" if kind == "llama3" else "type"): kind, **rope}
    cfg.pop("layer_types", None)
    if cfg["model_type"] in ("qwen2", "qwen3") and not cfg["use_sliding_window"]:
        cfg["sliding_window"] = 32768
    if cfg.get("head_dim") == cfg["hidden_size"] // cfg["num_attention_heads"]:
        del cfg["head_dim"]  # older Llama/Mistral configs have none
    return cfg


@pytest.mark.parametrize("name", ["llama_gqa_untied", "llama3_rope_biases_head_dim", "mistral_window", "qwen2_tied",
                                  "qwen2_window_upper_layers", "qwen3_qk_norm_head_dim_bias"])
def test_older_hub_config_format_loads_to_the_same_config_and_logits(ckpts, tmp_path, name):
    new = ckpts[name]
    old = tmp_path / name
    # sharded weights with a model.safetensors.index.json, as large hub checkpoints are
    reference(new).save_pretrained(old, max_shard_size="20KB")
    assert (old / "model.safetensors.index.json").exists() and len(list(old.glob("*.safetensors"))) > 1
    hub = to_hub_format(json.loads((new / "config.json").read_text()))
    (old / "config.json").write_text(json.dumps(hub))
    assert "rope_parameters" not in hub and "layer_types" not in hub
    a, b = ours(new), rj.load(old)
    assert b.config == a.config
    assert jax.tree_util.tree_structure(a.params) == jax.tree_util.tree_structure(b.params)
    # same config and parameters: the same logits by construction
    assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(np.array_equal, a.params, b.params)))
    ids, mask = left_padded(LENGTHS, seed=7)
    expected = hf_logits(old, ids, mask)  # transformers reading the older format agrees with us
    np.testing.assert_allclose(np.asarray(a(ids, mask))[mask.astype(bool)], expected[mask.astype(bool)], atol=TOL,
                               rtol=0)


# Abridged config.json files of real hub checkpoints (older format), as transformers reads them.
HUB_CONFIGS = {
    "Llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                       num_hidden_layers=32, num_key_value_heads=32, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, rope_scaling=None, rope_theta=10000.0, pretraining_tp=1,
                       tie_word_embeddings=False, vocab_size=32000, bos_token_id=1, eos_token_id=2),
    "Llama-3.1-8B": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                         num_hidden_layers=32, num_key_value_heads=8, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, rope_theta=500000.0, vocab_size=128256, bos_token_id=128000,
                         eos_token_id=[128001, 128008, 128009], attention_bias=False, mlp_bias=False,
                         rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192, rope_type="llama3")),
    "vicuna-7b-v1.5-16k": dict(model_type="llama", hidden_size=4096, intermediate_size=11008,
                               num_attention_heads=32, num_hidden_layers=32, max_position_embeddings=4096,
                               rms_norm_eps=1e-5, rope_scaling=dict(factor=4.0, type="linear"), vocab_size=32000),
    "Mistral-7B-v0.1": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336,
                            num_attention_heads=32, num_hidden_layers=32, num_key_value_heads=8,
                            max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0,
                            sliding_window=4096, vocab_size=32000, tie_word_embeddings=False),
    "Qwen2.5-0.5B": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                         num_hidden_layers=24, num_key_value_heads=2, max_position_embeddings=32768,
                         max_window_layers=24, rms_norm_eps=1e-6, rope_theta=1000000.0, sliding_window=32768,
                         use_sliding_window=False, tie_word_embeddings=True, vocab_size=151936,
                         bos_token_id=151643, eos_token_id=151643),
    "Qwen3-0.6B": dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_attention_heads=16,
                       num_hidden_layers=28, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                       max_window_layers=28, rms_norm_eps=1e-6, rope_scaling=None, rope_theta=1000000,
                       sliding_window=None, use_sliding_window=False, attention_bias=False,
                       tie_word_embeddings=True, vocab_size=151936, bos_token_id=151643, eos_token_id=151645),
}
HF_CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}


@pytest.mark.parametrize("name", sorted(HUB_CONFIGS))
def test_real_hub_configs_read_as_transformers_reads_them(name):
    hub = HUB_CONFIGS[name]
    cfg = rj.LlamaConfig.from_hf(hub) if hub["model_type"] in ("llama", "mistral") else rj.QwenConfig.from_hf(hub)
    ref = HF_CONFIGS[hub["model_type"]](**{k: v for k, v in hub.items() if k != "model_type"})
    lc = cfg.layer_config()
    assert (lc.head_size, lc.kv_heads, cfg.max_length) == (hf_head_dim(ref), ref.num_key_value_heads,
                                                           ref.max_position_embeddings)
    assert cfg.decoder_spec().tie_embeddings == ref.tie_word_embeddings
    window = getattr(ref, "sliding_window", None)
    types = getattr(ref, "layer_types", None) or ["sliding_attention" if window else "full_attention"] * 32
    want = [window if t == "sliding_attention" else 0 for t in types]
    np.testing.assert_array_equal(cfg.layer_meta()["window"], want)
    kind = ref.rope_parameters["rope_type"]
    assert cfg.rope_parameters.scaling == kind
    if kind != "default":
        np.testing.assert_allclose(cfg.rope_parameters.inv_freq(lc.head_size),
                                   ROPE_INIT_FUNCTIONS[kind](ref)[0].numpy(), rtol=1e-6)
    assert cfg.rope_parameters.theta == ref.rope_parameters["rope_theta"]
    hash(cfg)  # frozen and hashable, as every config


# ------------------------------------------------------------------ 5. unsupported settings

@pytest.mark.parametrize("change, match", [
    (dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0)), "rope_type 'yarn' is not supported"),
    (dict(rope_parameters=None, rope_theta=1e4, rope_scaling=dict(type="dynamic", factor=2.0)),
     "rope_type 'dynamic' is not supported"),
    (dict(rope_parameters=None, rope_theta=1e4, rope_scaling=dict(rope_type="longrope", factor=2.0)),
     "rope_type 'longrope' is not supported"),
    (dict(hidden_act="relu2"), r"hidden_act 'relu2' is not supported; supported: \[.*'silu'"),
    (dict(rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5)),
     "partial_rotary_factor 0.5 is not supported"),
    (dict(model_type="qwen2", layer_types=["full_attention"] * 2 + ["chunked_attention"]),
     r"layer_types \['chunked_attention'\] are not supported"),
    (dict(model_type="qwen2", layer_types=["full_attention"] * 2 + ["sliding_attention"],
          use_sliding_window=False),
     "sliding_attention layers but no sliding_window"),
    (dict(num_attention_heads=4, num_key_value_heads=3), "4 query heads cannot share 3 kv heads"),
])
def test_unsupported_settings_are_a_value_error_naming_them(ckpts, tmp_path, change, match):
    cfg = {**json.loads((ckpts["llama_gqa_untied"] / "config.json").read_text()), **change}
    family = rj.QwenConfig if cfg["model_type"] == "qwen2" else rj.LlamaConfig
    with pytest.raises(ValueError, match=match):
        family.from_hf(cfg)
    d = tmp_path / "bad"
    shutil.copytree(ckpts["llama_gqa_untied"], d)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(rj.CheckpointError, match=match):  # a ValueError naming config.json and the setting
        rj.load(d)
