"""Gemma 2, Gemma 3 (text and multimodal checkpoints) and GPT-2 against transformers (PyTorch), fp32.

The reference: tiny random checkpoints written by transformers' ``save_pretrained``
and perturbed away from their init (``conftest.perturb_``: Gemma's norm weights
start at 0), loaded back by transformers with eager attention (soft-capping).
Every sequence is longer than the sliding window, and the configs make each
mapping matter: local and global layers alternate (Gemma 3: one global every
third layer), each kind with its own RoPE theta (Gemma 3's global one linearly
scaled), ``query_pre_attn_scalar`` differs from ``head_dim`` and Gemma 2's
soft-caps are small enough to bite.

Our parallel forward numbers positions over the real tokens; transformers is
given the same ``position_ids`` on padded batches (its ``generate`` does that itself).
"""
import json
import shutil

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import radial_jax as rj
from conftest import perturb_
from radial_jax.models.family import config_from_hf
from radial_jax.models.families.gemma import GemmaConfig
from radial_jax.models.families.gpt2 import GPT2Config
from test_profiling import check_against_hooks, hf_block_ratios

TOL = 1e-4
VOCAB = 96
WINDOW = 4
PAD = 0
LENGTHS = [14, 9, 3]  # a left-padded batch, longest row > 3 windows
GEN_LENGTHS = [7, 3, 1, 5]
NEW = 12  # decoding goes well past the window

GEMMA_TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, sliding_window=WINDOW, max_position_embeddings=64,
                  query_pre_attn_scalar=24, rms_norm_eps=1e-6, pad_token_id=PAD, bos_token_id=2, eos_token_id=1)
GEMMA2 = dict(GEMMA_TINY, num_hidden_layers=4, attn_logit_softcapping=3.0, final_logit_softcapping=5.0,
              rope_parameters={"rope_type": "default", "rope_theta": 500.0})
GEMMA3 = dict(GEMMA_TINY, num_hidden_layers=6, sliding_window_pattern=3,
              rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 20000.0},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 300.0}})
GPT2 = dict(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64, bos_token_id=2, eos_token_id=2,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)

# name -> (transformers config class, model class, config kwargs, perturbation scale, save_pretrained kwargs)
CHECKPOINTS = {
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", GEMMA2, 0.3, {}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", GEMMA3, 0.3, dict(max_shard_size="60KB")),  # sharded
    "gemma3_untied_bias": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                           dict(GEMMA3, num_hidden_layers=3, attention_bias=True, tie_word_embeddings=False), 0.1, {}),
    "gemma3_multimodal": ("Gemma3Config", "Gemma3ForConditionalGeneration", None, 0.3, {}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", GPT2, 0.3, {}),
    "gpt2_untied_unscaled": ("GPT2Config", "GPT2LMHeadModel",
                             dict(GPT2, tie_word_embeddings=False, scale_attn_weights=False, n_inner=48,
                                  activation_function="relu"), 0.1, {}),
}
LIVELY = ["gemma2", "gemma3", "gpt2"]  # strongly perturbed: varied greedy output (multimodal: gemma3 text code)


def multimodal_config():
    from transformers import Gemma3Config, SiglipVisionConfig
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    text = dict(GEMMA3, num_hidden_layers=3, sliding_window_pattern=2)
    return Gemma3Config(text_config=text, vision_config=vision.to_dict(), mm_tokens_per_image=4,
                        boi_token_index=93, eoi_token_index=94, image_token_index=95)


def reference(path, name):
    import transformers
    cls = getattr(transformers, CHECKPOINTS[name][1])
    return cls.from_pretrained(path, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> checkpoint directory, written lazily (one per entry of ``CHECKPOINTS``)."""
    import transformers
    root = tmp_path_factory.mktemp("gemma_gpt2")
    made = {}

    def get(name):
        if name not in made:
            config_cls, model_cls, kwargs, scale, save_kwargs = CHECKPOINTS[name]
            config = multimodal_config() if kwargs is None else getattr(transformers, config_cls)(**kwargs)
            seed = sorted(CHECKPOINTS).index(name)
            torch.manual_seed(seed)
            model = perturb_(getattr(transformers, model_cls)(config), seed, scale=scale).eval()
            model.save_pretrained(root / name, **save_kwargs)
            made[name] = root / name
        return made[name]
    return get


@pytest.fixture(scope="module")
def models(checkpoints):
    """name -> (our model, the transformers reference), loaded once."""
    loaded = {}

    def get(name):
        if name not in loaded:
            path = checkpoints(name)
            loaded[name] = (rj.load(path), reference(path, name))
        return loaded[name]
    return get


def left_padded(lengths, seed=0):
    rng = np.random.default_rng(seed)
    t = max(lengths)
    ids = np.full((len(lengths), t), PAD, np.int64)
    mask = np.zeros((len(lengths), t), np.int64)
    for row, n in enumerate(lengths):
        ids[row, t - n:] = rng.integers(3, 90, n)  # clear of the multimodal image tokens 93..95
        mask[row, t - n:] = 1
    return ids, mask


def hf_positions(mask):
    """Positions over the real tokens, as ours (and transformers' ``generate``) count them."""
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def hf_logits(ref, ids, mask=None):
    kwargs = {} if mask is None else dict(attention_mask=torch.tensor(mask),
                                          position_ids=torch.tensor(hf_positions(mask)))
    with torch.no_grad():
        return ref(input_ids=torch.tensor(ids), **kwargs).logits.numpy()


def assert_same_params(a, b):
    """Same parameter tree and values: with the same config, the same logits (no second compilation)."""
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def rewrite_config(src, dst, edit):
    """Copy checkpoint ``src`` to ``dst`` with its config.json passed through ``edit(dict) -> dict``."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(edit(config), indent=2))
    return dst


# ------------------------------------------------------------------ 1. logits

@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_logits_match_transformers_on_left_padded_rows_longer_than_the_window(models, name):
    ours, ref = models(name)
    ids, mask = left_padded(LENGTHS)
    expected = hf_logits(ref, ids, mask)
    got = np.asarray(ours(ids, mask))
    valid = mask.astype(bool)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got[valid], expected[valid], atol=TOL, rtol=0)


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_logits_match_transformers_without_padding(models, name):
    ours, ref = models(name)
    ids = np.random.default_rng(1).integers(3, 90, (len(LENGTHS), max(LENGTHS)))
    # an all-ones mask keeps the compiled shapes of the padded test; transformers gets no mask at all
    got = np.asarray(ours(ids, np.ones_like(ids)))
    np.testing.assert_allclose(got, hf_logits(ref, ids), atol=TOL, rtol=0)


def test_configs_read_every_setting_the_checkpoints_carry(models):
    g2, g3, mm = (models(n)[0].config for n in ("gemma2", "gemma3", "gemma3_multimodal"))
    assert g2.layer_types == ("sliding_attention", "full_attention") * 2
    assert g3.layer_types == ("sliding_attention", "sliding_attention", "full_attention") * 2
    assert mm.model_type == "gemma3" and mm.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert g2.rope("full_attention").theta == g2.rope("sliding_attention").theta == 500.0
    full, local = g3.rope("full_attention"), g3.rope("sliding_attention")
    assert (full.theta, full.scaling, full.factor, local.theta, local.scaling) == (20000.0, "linear", 4.0, 300.0,
                                                                                   "default")
    meta = g3.layer_meta()
    np.testing.assert_array_equal(meta["window"], [WINDOW, WINDOW, 0] * 2)
    np.testing.assert_array_equal(meta["rope"], [1, 1, 0] * 2)  # LAYER_TYPES order: full 0, sliding 1
    lc = g2.layer_config()
    assert (lc.attn_softcap, g2.decoder_spec().final_logit_softcap, lc.attn_scale) == (3.0, 5.0, 24 ** -0.5)
    assert not lc.qk_norm and g3.layer_config().qk_norm
    gpt2 = models("gpt2_untied_unscaled")[0].config
    assert (gpt2.n_inner, gpt2.layer_config().attn_scale, gpt2.decoder_spec().tie_embeddings) == (48, 1.0, False)
    assert models("gpt2")[0].config.n_inner == 4 * 32


# ------------------------------------------------------------------ 2. generation

@pytest.mark.parametrize("name", LIVELY)
def test_greedy_generation_matches_transformers_decoding_past_the_window(models, name):
    ours, ref = models(name)
    ids, mask = left_padded(GEN_LENGTHS, seed=2)
    got = ours.generate(ids, mask, max_new_tokens=NEW, pad_token_id=PAD)
    with torch.no_grad():
        expected = ref.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                max_new_tokens=NEW, pad_token_id=PAD).numpy()
    # transformers stops the batch once every row has ended; the rest of ours must be padding
    assert got.shape == (len(GEN_LENGTHS), max(GEN_LENGTHS) + NEW) and got.shape[1] >= expected.shape[1]
    np.testing.assert_array_equal(got[:, :expected.shape[1]], expected)
    assert (got[:, expected.shape[1]:] == PAD).all()
    assert len(np.unique(got[:, max(GEN_LENGTHS):])) > 3  # not trivially satisfied by a constant output
    assert max(GEN_LENGTHS) + NEW > 3 * WINDOW


# ------------------------------------------------------------------ 3. residual ratios

@pytest.mark.parametrize("name", ["gemma3", "gpt2"])
def test_residual_ratios_match_transformers_forward_hooks(models, name):
    """Gemma: f of a block is its post-norm's output (what is added to the residual stream)."""
    ours, ref = models(name)
    ids, mask = left_padded([11, 6, 9], seed=3)
    result = rj.profile(ours, [(ids, mask)], keep_raw=True, progress=False)
    if name.startswith("gemma"):
        layers, attn, mlp = ref.model.layers, "post_attention_layernorm", "post_feedforward_layernorm"
    else:
        layers, attn, mlp = ref.transformer.h, "attn", "mlp"
    hooks = hf_block_ratios(layers, lambda: ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                                position_ids=torch.tensor(hf_positions(mask))),
                            post_ln=False, attn_name=attn, mlp_name=mlp)
    check_against_hooks(result, hooks, mask.astype(bool))
    assert result.tokens == mask.sum()


# ------------------------------------------------------------------ 4. hub formats

def gemma2_hub_format(config):
    """transformers >= 5 config.json -> the format of the hub's Gemma 2 checkpoints (transformers 4.42)."""
    config = dict(config)
    del config["layer_types"], config["use_bidirectional_attention"]
    config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
    config.update(hidden_act=config["hidden_activation"], cache_implementation="hybrid",
                  transformers_version="4.42.4")
    return config


def gemma3_hub_format(config, pattern=3):
    """transformers >= 5 config.json -> the format of the hub's Gemma 3 checkpoints (transformers 4.50)."""
    config = dict(config)
    for key in ("layer_types", "_sliding_window_pattern", "use_bidirectional_attention"):
        config.pop(key, None)
    rope = config.pop("rope_parameters")
    full = dict(rope["full_attention"])
    config.update(rope_theta=full.pop("rope_theta"), rope_local_base_freq=rope["sliding_attention"]["rope_theta"],
                  rope_scaling=full if full["rope_type"] != "default" else None, sliding_window_pattern=pattern,
                  transformers_version="4.50.0.dev0")
    return config


@pytest.mark.parametrize("name, edit", [("gemma2", gemma2_hub_format), ("gemma3", gemma3_hub_format)])
def test_hub_format_config_loads_to_the_same_config_and_logits(checkpoints, models, tmp_path, name, edit):
    ours, _ = models(name)
    old = rewrite_config(checkpoints(name), tmp_path / "old", edit)
    text = json.loads((old / "config.json").read_text())
    assert "layer_types" not in text and "rope_parameters" not in text and "rope_theta" in text
    loaded = rj.load(old)
    assert loaded.config == ours.config
    assert_same_params(loaded.params, ours.params)
    ids, mask = left_padded(LENGTHS, seed=4)
    got = np.asarray(ours(ids, mask))
    # transformers reads the rewritten file the same way: the rewrite is the old format, not just ours
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], hf_logits(reference(old, name), ids, mask)[valid], atol=TOL, rtol=0)


def test_multimodal_checkpoint_loads_its_text_model_under_either_tensor_naming(checkpoints, models, tmp_path):
    """As saved (``language_model.model.*``, hub layout) and as transformers >= 4.52 names its modules
    (``model.language_model.*``); the vision tower and projector are ignored either way."""
    ours, _ = models("gemma3_multimodal")
    src = checkpoints("gemma3_multimodal")
    tensors = load_file(src / "model.safetensors")
    assert any(k.startswith("vision_tower.") for k in tensors) and any(k.startswith("language_model.model.")
                                                                         for k in tensors)
    renamed = {("model." + k.replace("language_model.model.", "language_model.", 1)): v for k, v in tensors.items()}
    new = tmp_path / "renamed"
    new.mkdir()
    shutil.copy(src / "config.json", new / "config.json")
    save_file(renamed, new / "model.safetensors")
    loaded = rj.load(new)
    assert loaded.config == ours.config
    assert_same_params(loaded.params, ours.params)


def test_gpt2_checkpoint_in_the_original_layout_with_mask_buffers_loads(checkpoints, models, tmp_path):
    """openai-community/gpt2's layout: no ``transformer.`` prefix, ``attn.bias`` / ``attn.masked_bias`` buffers."""
    ours, _ = models("gpt2")
    src = checkpoints("gpt2")
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(src / "model.safetensors").items()}
    n = ours.config.n_positions
    for i in range(ours.config.n_layer):
        tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((n, n), np.uint8)).reshape(1, 1, n, n)
        tensors[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    old = tmp_path / "gpt2_original"
    old.mkdir()
    shutil.copy(src / "config.json", old / "config.json")
    save_file(tensors, old / "model.safetensors")
    assert_same_params(rj.load(old).params, ours.params)
    tensors["h.0.attn.c_attn.extra"] = np.zeros(3, np.float32)  # a real unknown tensor is still an error
    save_file(tensors, old / "model.safetensors")
    with pytest.raises(rj.CheckpointError, match="unexpected tensors.*c_attn.extra"):
        rj.load(old)


# Real hub config.json files (abridged to what matters), read by us and by transformers.
GEMMA2_2B = dict(model_type="gemma2", architectures=["Gemma2ForCausalLM"], attn_logit_softcapping=50.0,
                 final_logit_softcapping=30.0, head_dim=256, hidden_act="gelu_pytorch_tanh",
                 hidden_activation="gelu_pytorch_tanh", hidden_size=2304, intermediate_size=9216,
                 max_position_embeddings=8192, num_attention_heads=8, num_hidden_layers=26, num_key_value_heads=4,
                 query_pre_attn_scalar=256, rope_theta=10000.0, sliding_window=4096, vocab_size=256000,
                 cache_implementation="hybrid")
GEMMA3_1B = dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], attn_logit_softcapping=None,
                 final_logit_softcapping=None, eos_token_id=[1, 106], head_dim=256, hidden_size=1152,
                 intermediate_size=6912, max_position_embeddings=32768, num_attention_heads=4, num_hidden_layers=26,
                 num_key_value_heads=1, query_pre_attn_scalar=256, rope_local_base_freq=10000, rope_scaling=None,
                 rope_theta=1000000, sliding_window=512, sliding_window_pattern=6, vocab_size=262144)
GEMMA3_4B = dict(model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"], eos_token_id=[1, 106],
                 mm_tokens_per_image=256, image_token_index=262144,
                 text_config=dict(hidden_size=2560, intermediate_size=10240, model_type="gemma3_text",
                                  num_hidden_layers=34, rope_scaling={"factor": 8.0, "rope_type": "linear"},
                                  sliding_window=1024),
                 vision_config=dict(hidden_size=1152, image_size=896, intermediate_size=4304,
                                    model_type="siglip_vision_model", num_attention_heads=16, num_hidden_layers=27,
                                    patch_size=14, vision_use_head=False))


@pytest.mark.parametrize("hub", [GEMMA2_2B, GEMMA3_1B, GEMMA3_4B], ids=["gemma-2-2b", "gemma-3-1b", "gemma-3-4b"])
def test_hub_configs_are_read_as_transformers_reads_them(hub):
    import transformers
    ours = config_from_hf(json.loads(json.dumps(hub)))
    theirs = transformers.AutoConfig.for_model(**json.loads(json.dumps(hub)))
    text = theirs.get_text_config()
    assert isinstance(ours, GemmaConfig) and ours.model_type == hub["model_type"]
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window",
                  "query_pre_attn_scalar", "hidden_activation", "rms_norm_eps"):
        assert getattr(ours, field) == getattr(text, field), field
    assert ours.layer_types == tuple(text.layer_types)
    for layer_type in set(text.layer_types):
        theirs_rope = text.rope_parameters.get(layer_type, text.rope_parameters)
        rope = ours.rope(layer_type)
        assert (rope.theta, rope.scaling, rope.factor) == (theirs_rope["rope_theta"], theirs_rope["rope_type"],
                                                           theirs_rope.get("factor", 1.0)), layer_type
    if hub["model_type"] == "gemma2":
        assert (ours.attn_logit_softcapping, ours.final_logit_softcapping) == (50.0, 30.0)
    else:
        assert ours.attn_logit_softcapping is None and ours.final_logit_softcapping is None
    assert ours.eos_token_id == tuple(hub["eos_token_id"]) if "eos_token_id" in hub else ours.eos_token_id == 1


def test_config_round_trips_through_asdict():
    import dataclasses
    config = config_from_hf(GEMMA3_4B)
    assert GemmaConfig(**json.loads(json.dumps(dataclasses.asdict(config)))) == config
    gpt2 = GPT2Config(n_embd=64, n_head=4)
    assert GPT2Config(**dataclasses.asdict(gpt2)) == gpt2


# ------------------------------------------------------------------ 5. bad configs

def _gemma3_text(**changes):
    return {**dict(GEMMA3_1B), **changes}


def _mm(**text_changes):
    return {**GEMMA3_4B, "text_config": {**GEMMA3_4B["text_config"], **text_changes}}


GPT2_HUB = dict(model_type="gpt2", vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                activation_function="gelu_new", n_ctx=1024)


@pytest.mark.parametrize("hf, match", [
    ({**GEMMA2_2B, "use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({**GEMMA2_2B, "hidden_activation": "swish"}, "hidden_activation 'swish' is not supported"),
    ({**GEMMA2_2B, "sliding_window": None}, "sliding_window must be an integer >= 1"),
    ({**GEMMA2_2B, "layer_types": ["full_attention"] * 3}, "layer_types has 3 entries for 26 layers"),
    ({**GEMMA2_2B, "num_hidden_layers": None}, "num_hidden_layers must be an integer"),
    ({**GEMMA2_2B, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_parameters.*'yarn' is not supported"),
    ({**GEMMA2_2B, "query_pre_attn_scalar": 0}, "query_pre_attn_scalar must be a number > 0"),
    ({**GEMMA2_2B, "final_logit_softcapping": -1.0}, "final_logit_softcapping must be None"),
    ({**GEMMA2_2B, "num_attention_heads": 6}, "num_attention_heads 6 is not a multiple of num_key_value_heads 4"),
    (_gemma3_text(layer_types=["chunked_attention"] * 26), r"layer_types \['chunked_attention'\] are not supported"),
    (_gemma3_text(sliding_window_pattern=0), "sliding_window_pattern must be an integer >= 1"),
    (_gemma3_text(rope_parameters={"rope_type": "default", "rope_theta": 1e4}), "keyed by layer type"),
    (_gemma3_text(rope_parameters={"full_attention": {"rope_type": "dynamic", "factor": 2.0}}),
     r"rope_parameters\['full_attention'\].*'dynamic' is not supported"),
    (_gemma3_text(rope_parameters={"full_attention": {"rope_type": "default", "partial_rotary_factor": 0.5}}),
     "partial_rotary_factor 0.5 is not supported"),
    (_mm(model_type="llama"), "text_config.model_type 'llama' is not supported"),
    (_mm(use_bidirectional_attention=True), "use_bidirectional_attention"),
    ({**GPT2_HUB, "scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True is not supported"),
    ({**GPT2_HUB, "add_cross_attention": True}, "add_cross_attention=True is not supported"),
    ({**GPT2_HUB, "activation_function": "swiglu"}, "activation_function 'swiglu' is not supported"),
    ({**GPT2_HUB, "n_embd": 770}, "n_embd 770 is not divisible by n_head 12"),
    ({**GPT2_HUB, "n_layer": 0}, "n_layer must be an integer >= 1"),
])
def test_unsupported_config_is_a_value_error_naming_the_setting(hf, match):
    with pytest.raises(ValueError, match=match):
        config_from_hf(json.loads(json.dumps(hf)))


def test_checkpoint_with_an_unsupported_setting_fails_to_load_naming_it(checkpoints, tmp_path):
    bad = rewrite_config(checkpoints("gpt2"), tmp_path / "bad", lambda c: {**c, "scale_attn_by_inverse_layer_idx": True})
    with pytest.raises(ValueError, match=r"config\.json.*scale_attn_by_inverse_layer_idx=True is not supported"):
        rj.load(bad)
