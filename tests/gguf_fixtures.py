"""Tiny GGUF files written the way llama.cpp's ``convert_hf_to_gguf.py`` writes them.

The models are tiny random transformers (PyTorch) models, perturbed away from
their init so that every tensor's mapping matters. The writer is independent of
``radial_jax.checkpoints.gguf``: Hugging Face names go to GGUF names through gguf-py's own
``TensorNameMap`` (as llama.cpp's converter does), with llama.cpp's transforms
(q/k rows permuted for ``llama``, Gemma norms stored as ``1 + w``, GPT-2's Conv1D
weights transposed and its output matrix duplicated, Llama 3 rope scaling as a
``rope_freqs`` tensor), the metadata keys llama.cpp writes for each model, and a
tiny byte-level BPE tokenizer in the metadata (``tokenizer.ggml.model = "gpt2"``)
that transformers can build a tokenizer from.

Quantized types: F32, F16, BF16 and Q8_0 through ``gguf.quants.quantize``; the
K-quants (Q4_K, Q5_K, Q6_K), which gguf-py cannot quantize, as random valid
blocks (random bytes with finite, small f16 scales). As in llama.cpp, 1-D tensors
(norms, biases, rope factors) stay F32. Every 2-D tensor's rows are multiples of
256 so that the K-quants apply to all of them.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

VOCAB_SPECIAL = ["<|endoftext|>", "<pad>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "e r"]
HIDDEN = 256  # K-quant blocks are 256 wide: every matrix's row length is a multiple of it

# the storage types the tests write: gguf-py quantizes the legacy ones (Q4_0 ... Q8_0); K-quants get random
# valid blocks. llama.cpp's Q4_K_M files mix Q4_K, Q5_0 and Q6_K.
QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


def tiny_tokenizer():
    """(tokens, token types, merges, bos/eos id, pad id) of a byte-level BPE with a few merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    byte_tokens = list(bytes_to_unicode().values())  # the 256 byte symbols, in byte order
    merged = [m.replace(" ", "") for m in MERGES]
    tokens = byte_tokens + merged + VOCAB_SPECIAL
    types = [1] * (len(tokens) - len(VOCAB_SPECIAL)) + [3] * len(VOCAB_SPECIAL)  # 1 normal, 3 control
    return tokens, types, list(MERGES), tokens.index("<|endoftext|>"), tokens.index("<pad>")


VOCAB = len(tiny_tokenizer()[0])
_, _, _, EOS_ID, PAD_ID = tiny_tokenizer()

_DECODER = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=HIDDEN, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=EOS_ID,
                eos_token_id=EOS_ID, pad_token_id=PAD_ID)

# name -> (transformers model class, config class, config kwargs, GGUF architecture, general.name)
MODELS = {
    # Llama 2 style with grouped-query attention and an untied output matrix
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(_DECODER, rms_norm_eps=1e-5, rope_theta=10000.0,
                                                      tie_word_embeddings=False), "llama", "tiny llama"),
    # Llama 3.1 style: rope scaling of type llama3 (written by llama.cpp as rope_freqs.weight), tied embeddings.
    # Not Meta's published factors, so that the parameters have to be recovered from the factors.
    "llama3": ("LlamaForCausalLM", "LlamaConfig", dict(
        _DECODER, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=True,
        rope_scaling=dict(rope_type="llama3", factor=16.0, low_freq_factor=1.0, high_freq_factor=8.0,
                          original_max_position_embeddings=16384)), "llama", "tiny llama 3"),
    # Meta's published Llama 3.1 rope scaling, which has to come back exactly
    "llama3_meta": ("LlamaForCausalLM", "LlamaConfig", dict(
        _DECODER, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=True,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192)), "llama", "tiny llama 3.1"),
    # llama.cpp writes Mistral as llama; transformers reads it back as mistral when general.name is "mistral"
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(_DECODER, rms_norm_eps=1e-5, rope_theta=10000.0,
                                                            tie_word_embeddings=False), "llama", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(_DECODER, rms_norm_eps=1e-6, rope_theta=1000000.0,
                                                      tie_word_embeddings=True), "qwen2", "tiny qwen2"),
    # head_dim 128 (Qwen3's real value, which transformers' GGUF loader assumes) != hidden / heads = 64
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(_DECODER, head_dim=128, rms_norm_eps=1e-6,
                                                      rope_theta=1000000.0, tie_word_embeddings=False),
              "qwen3", "tiny qwen3"),
    # sliding window 4 < the test sequence: the window matters on layer 0
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(_DECODER, head_dim=64, sliding_window=4,
                                                         hidden_activation="gelu_pytorch_tanh"),
               "gemma2", "tiny gemma2"),
    # strong softcapping, far from Gemma2Config's defaults (50, 30), which transformers' GGUF loader falls back to
    "gemma2_softcap": ("Gemma2ForCausalLM", "Gemma2Config", dict(
        _DECODER, head_dim=64, sliding_window=4, attn_logit_softcapping=2.0, final_logit_softcapping=1.5),
        "gemma2", "tiny gemma2 softcap"),
    # 6 layers: Gemma 3's pattern is 5 sliding-window layers, then a global one (rope 1e6 vs 10000)
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(_DECODER, num_hidden_layers=6, head_dim=64,
                                                             sliding_window=4, num_key_value_heads=1),
               "gemma3", "tiny gemma3"),
    # n_positions 1024 and n_inner 4 * n_embd: what transformers' GGUF loader assumes for GPT-2
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4,
                                                   n_positions=1024, bos_token_id=EOS_ID, eos_token_id=EOS_ID,
                                                   layer_norm_epsilon=1e-5), "gpt2", "tiny gpt2"),
}

_FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0",
               "Q4_K": "MOSTLY_Q4_K_M", "Q5_K": "MOSTLY_Q5_K_M", "Q6_K": "MOSTLY_Q6_K", "Q4_0": "MOSTLY_Q4_0",
               "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1"}


def make_model(name: str, seed: int = 0, **overrides):
    """The tiny transformers model ``name`` (a key of MODELS), perturbed away from its init, in eval mode."""
    import torch
    import transformers
    cls_name, config_name, kwargs, _, _ = MODELS[name]
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(**{**kwargs, **overrides})
    model = getattr(transformers, cls_name)(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def llama_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` (convert_hf_to_gguf.py), for q/k rows."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(hparams: dict) -> np.ndarray:
    """llama.cpp's ``LlamaModel.generate_extra_tensors`` for rope_type llama3: the rope_freqs tensor.

    One difference: llama.cpp looks for ``original_max_position_embeddings`` at the
    top level of config.json (8192 if absent, Meta's value); transformers keeps it in
    the rope parameters, and this takes it from there.
    """
    import torch
    rope = hparams["rope_parameters"]
    base = rope.get("rope_theta", 10000.0)
    dim = hparams.get("head_dim") or hparams["hidden_size"] // hparams["num_attention_heads"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context_len = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_context_len / low, old_context_len / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32).numpy()


def random_kquant_blocks(shape, qtype, rng: np.random.Generator) -> np.ndarray:
    """Valid raw blocks of a K-quant type for a float tensor of ``shape``: random bytes, small finite f16 scales."""
    import gguf
    qt = gguf.GGMLQuantizationType[qtype]
    block, type_size = gguf.GGML_QUANT_SIZES[qt]
    rows = int(np.prod(shape[:-1]))
    n_blocks = rows * shape[-1] // block
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)

    def f16(n, lo, hi):
        return rng.uniform(lo, hi, size=(n, 1)).astype(np.float16).view(np.uint8)

    if qtype in ("Q4_K", "Q5_K"):  # d, dmin (f16) first; 6-bit scales/mins then make values d*sc*q - dmin*m
        blocks[:, 0:2] = f16(n_blocks, 2e-4, 1e-3)
        blocks[:, 2:4] = f16(n_blocks, 1e-4, 5e-4)
    elif qtype == "Q6_K":  # d (f16) last; int8 scales
        blocks[:, -2:] = f16(n_blocks, 1e-5, 5e-5)
    else:
        raise ValueError(qtype)
    return blocks.reshape(*shape[:-1], shape[-1] // block * type_size)


def _store(writer, name: str, data: np.ndarray, qtype: str, rng):
    """Add one tensor as llama.cpp would: 1-D tensors in F32, matrices in ``qtype``."""
    import gguf
    Q = gguf.GGMLQuantizationType
    data = np.ascontiguousarray(data, dtype=np.float32)
    if data.ndim <= 1 or qtype == "F32":
        writer.add_tensor(name, data)
    elif qtype == "F16":
        writer.add_tensor(name, data.astype(np.float16))
    elif qtype in ("BF16", "Q8_0"):
        writer.add_tensor(name, gguf.quants.quantize(data, Q[qtype]), raw_dtype=Q[qtype])
    elif qtype in ("Q4_K", "Q5_K", "Q6_K"):
        writer.add_tensor(name, random_kquant_blocks(data.shape, qtype, rng), raw_dtype=Q[qtype])
    elif qtype in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        writer.add_tensor(name, gguf.quants.quantize(data, Q[qtype]), raw_dtype=Q[qtype])
    else:  # a type gguf-py neither quantizes nor reads (Q8_1, for the unreadable-type test): zero blocks
        block, type_size = gguf.GGML_QUANT_SIZES[Q[qtype]]
        raw = np.zeros((*data.shape[:-1], data.shape[-1] // block * type_size), np.uint8)
        writer.add_tensor(name, raw, raw_dtype=Q[qtype])


def _metadata(writer, arch: str, hp: dict, qtype: str):
    """The metadata keys llama.cpp's converter writes for this architecture (TextModel + the model's class)."""
    import gguf
    if arch == "gpt2":  # GPT2Model.set_gguf_parameters
        writer.add_block_count(hp["n_layer"])
        writer.add_context_length(hp["n_positions"])
        writer.add_embedding_length(hp["n_embd"])
        writer.add_feed_forward_length(4 * hp["n_embd"])
        writer.add_head_count(hp["n_head"])
        writer.add_layer_norm_eps(hp["layer_norm_epsilon"])
    elif arch == "gemma2":  # Gemma2Model.set_gguf_parameters (no rope base: llama.cpp uses 10000)
        writer.add_context_length(hp["max_position_embeddings"])
        writer.add_embedding_length(hp["hidden_size"])
        writer.add_block_count(hp["num_hidden_layers"])
        writer.add_feed_forward_length(hp["intermediate_size"])
        writer.add_head_count(hp["num_attention_heads"])
        writer.add_head_count_kv(hp["num_key_value_heads"])
        writer.add_layer_norm_rms_eps(hp["rms_norm_eps"])
        writer.add_key_length(hp["head_dim"])
        writer.add_value_length(hp["head_dim"])
        writer.add_attn_logit_softcapping(hp["attn_logit_softcapping"])
        writer.add_final_logit_softcapping(hp["final_logit_softcapping"])
        writer.add_sliding_window(hp["sliding_window"])
    else:  # TextModel.set_gguf_parameters, then the model class's additions
        rope = hp.get("rope_parameters") or {}
        full = rope.get("full_attention", rope)
        writer.add_block_count(hp["num_hidden_layers"])
        writer.add_context_length(hp["max_position_embeddings"])
        writer.add_embedding_length(hp["hidden_size"])
        writer.add_feed_forward_length(hp["intermediate_size"])
        writer.add_head_count(hp["num_attention_heads"])
        writer.add_head_count_kv(hp["num_key_value_heads"])
        if full.get("rope_type") == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(full["factor"])
        writer.add_rope_freq_base(full["rope_theta"])
        if "sliding_attention" in rope:
            writer.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
        writer.add_layer_norm_rms_eps(hp["rms_norm_eps"])
        if hp.get("head_dim") is not None:
            writer.add_key_length(hp["head_dim"])
            writer.add_value_length(hp["head_dim"])
        if arch == "llama":  # LlamaModel.set_gguf_parameters
            writer.add_vocab_size(hp["vocab_size"])
            writer.add_rope_dimension_count(hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"])
        if arch == "gemma3":  # Gemma3Model.set_gguf_parameters
            if hp.get("final_logit_softcapping"):
                writer.add_final_logit_softcapping(hp["final_logit_softcapping"])
            writer.add_sliding_window(hp["sliding_window"])
    writer.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES.get(qtype, "GUESSED")))


def write_gguf(path, model, qtype: str = "F32", *, arch: str | None = None, name: str | None = None,
               seed: int = 0, extra_metadata: dict | None = None, qtype_overrides: dict | None = None) -> Path:
    """Write ``model`` (a transformers model) to ``path`` as llama.cpp's converter would.

    Args:
      arch: the GGUF architecture (default: the model's, gemma3_text -> gemma3).
      name: ``general.name``.
      qtype: storage type of the matrices ("F32" ... "Q6_K", or another gguf-py quantizable type).
      extra_metadata: more ``{key: str | int | float}`` metadata (strings, uint32, float32).
      qtype_overrides: ``{gguf tensor name: qtype}`` for individual tensors.
    """
    import gguf
    import torch
    path = Path(path)
    hp = model.config.to_dict()
    model_type = hp["model_type"]
    arch = arch or {"gemma3_text": "gemma3", "mistral": "llama"}.get(model_type, model_type)
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, arch)  # writes general.architecture itself
    writer.add_name(name or f"tiny {model_type}")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _metadata(writer, arch, hp, qtype)
    for key, value in (extra_metadata or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_float32(key, float(value))

    tokens, types, merges, eos, pad = tiny_tokenizer()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(eos)
    writer.add_eos_token_id(eos)
    writer.add_pad_token_id(pad)

    arch_id = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    n_layers = hp.get("num_hidden_layers", hp.get("n_layer"))
    name_map = gguf.get_tensor_name_map(arch_id, n_layers)
    tied = hp.get("tie_word_embeddings", False)
    overrides = qtype_overrides or {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and (tied or arch in ("gemma2", "gemma3")):
            continue  # tied: not in the checkpoint; Gemma: llama.cpp drops lm_head
        if hf_name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        base, suffix = hf_name.rsplit(".", 1)
        gguf_base = name_map.get_name(base)
        assert gguf_base is not None, hf_name
        gguf_name = f"{gguf_base}.{suffix}"
        data = tensor.detach().to(torch.float32).numpy()
        if arch == "llama" and base.endswith("q_proj"):
            data = llama_permute(data, hp["num_attention_heads"], hp["num_attention_heads"])
        elif arch == "llama" and base.endswith("k_proj"):
            data = llama_permute(data, hp["num_attention_heads"], hp["num_key_value_heads"])
        elif arch in ("gemma2", "gemma3") and hf_name.endswith("norm.weight"):
            data = data + 1
        elif arch == "gpt2" and hf_name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            data = data.T
        _store(writer, gguf_name, data, overrides.get(gguf_name, qtype), rng)
        if arch == "gpt2" and gguf_name == "token_embd.weight":  # GPT2's output is tied to wte: written twice
            _store(writer, "output.weight", data, overrides.get("output.weight", qtype), rng)
    rope = hp.get("rope_parameters") or {}
    if arch == "llama" and rope.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(hp))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
