"""A GGUF file's metadata as a Hugging Face ``config.json`` dict, key by key as transformers' GGUF loader writes
it (see ``radial_jax.checkpoints.gguf`` for which keys and why)."""
from __future__ import annotations

from typing import Callable, Dict, Optional

from radial_jax.checkpoints.errors import CheckpointError
from radial_jax.models.names import GGUFNames


class GGUFMetadata:
    """The metadata (``meta``: key -> value; ``array_lengths``: key -> length of an array value) and tensor table
    (``infos``: GGUF name -> an object with ``.shape``) of a file of ``architecture``, read into a config.

    ``error(message)`` makes the ``CheckpointError`` that names the file."""

    def __init__(self, meta: dict, array_lengths: dict, infos: Dict[str, object], names: GGUFNames,
                 error: Callable[[str], CheckpointError]):
        self.meta, self.array_lengths, self.infos, self.names, self.error = meta, array_lengths, infos, names, error
        self.architecture = names.architecture

    def key(self, name: str, required: bool = True, default=None):
        key = f"{self.architecture}.{name}"
        if key in self.meta:
            value = self.meta[key]
            if isinstance(value, list):  # per-layer values: only a constant one maps to a HF config
                if len(set(value)) != 1:
                    raise self.error(f"metadata {key} varies per layer ({value}); only a single value is supported")
                value = value[0]
            return value
        if required:
            raise self.error(f"missing metadata key {key!r}, which a {self.architecture} GGUF file must have")
        return default

    def put_optional(self, config: dict, gguf_key: str, hf_key: str, convert) -> None:
        """``config[hf_key] = convert(value)`` when the metadata states ``gguf_key`` (else the config's default)."""
        value = self.key(gguf_key, required=False)
        if value is not None:
            config[hf_key] = convert(value)

    def vocab_size(self) -> int:
        vocab = self.key("vocab_size", required=False)
        if vocab is None:
            vocab = self.array_lengths.get("tokenizer.ggml.tokens")
        if vocab is None and "token_embd.weight" in self.infos:
            vocab = self.infos["token_embd.weight"].shape[0]
        if vocab is None:
            raise self.error("cannot tell the vocabulary size: no vocab_size metadata, no tokenizer.ggml.tokens "
                              "and no token_embd.weight")
        return int(vocab)

    def token_ids(self) -> dict:
        ids = {}
        for gguf_key, hf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                                 ("unknown_token_id", "unk_token_id"), ("padding_token_id", "pad_token_id")):
            value = self.meta.get(f"tokenizer.ggml.{gguf_key}")
            if value is not None:
                ids[hf_key] = int(value)
        return ids

    def rope_scaling(self) -> Optional[dict]:
        kind = self.key("rope.scaling.type", required=False)
        if kind is None or kind == "none":
            return None
        factor = self.key("rope.scaling.factor", required=False)
        if kind == "linear":
            if factor is None:
                raise self.error(f"rope scaling type 'linear' without {self.architecture}.rope.scaling.factor")
            return {"rope_type": "linear", "factor": float(factor)}
        if kind == "yarn":
            scaling = {"rope_type": "yarn", "factor": float(factor if factor is not None else 1.0)}
            self.put_optional(scaling, "rope.scaling.original_context_length", "original_max_position_embeddings", int)
            self.put_optional(scaling, "rope.scaling.yarn_beta_fast", "beta_fast", float)
            self.put_optional(scaling, "rope.scaling.yarn_beta_slow", "beta_slow", float)
            self.put_optional(scaling, "rope.scaling.yarn_attn_factor", "attention_factor", float)
            return scaling
        raise self.error(f"rope scaling type {kind!r} is not supported; supported: none, linear, yarn, "
                          f"and llama3 (as a rope_freqs.weight tensor)")

    def hf_config(self) -> dict:
        arch = self.architecture
        if arch == "gpt2":
            return self.gpt2_config()
        model_type = {"gemma3": "gemma3_text"}.get(arch, arch)
        if arch == "llama" and self.meta.get("general.name") == "mistral":
            model_type = "mistral"  # transformers' rule: llama.cpp writes Mistral as llama
        n_heads = int(self.key("attention.head_count"))
        config = {
            "model_type": model_type,
            "architectures": [self.names.hf_classes[model_type]],
            "vocab_size": self.vocab_size(),
            "hidden_size": int(self.key("embedding_length")),
            "intermediate_size": int(self.key("feed_forward_length")),
            "num_hidden_layers": int(self.key("block_count")),
            "num_attention_heads": n_heads,
            "num_key_value_heads": int(self.key("attention.head_count_kv", required=False, default=n_heads)),
            "max_position_embeddings": int(self.key("context_length")),
            "rms_norm_eps": float(self.key("attention.layer_norm_rms_epsilon")),
        }
        # head_dim: llama's from rope.dimension_count (as transformers), the others' from attention.key_length
        head_dim = self.key("rope.dimension_count", required=False) if arch == "llama" else None
        if head_dim is None:
            head_dim = self.key("attention.key_length", required=False)
        if head_dim is not None:
            config["head_dim"] = int(head_dim)
        self.put_optional(config, "rope.freq_base", "rope_theta", float)
        scaling = self.rope_scaling()
        if scaling is not None:
            config["rope_scaling"] = scaling
        if arch in ("gemma2", "gemma3"):
            self.put_optional(config, "attention.sliding_window", "sliding_window", int)
            self.put_optional(config, "final_logit_softcapping", "final_logit_softcapping", float)
        if arch == "gemma2":
            self.put_optional(config, "attn_logit_softcapping", "attn_logit_softcapping", float)
        if arch == "gemma3":
            # llama.cpp runs Gemma 3's sliding-window layers with this base, 10000 when the file does not say
            config["rope_local_base_freq"] = float(self.key("rope.freq_base_swa", required=False, default=10000.0))
        if arch == "llama" and "blk.0.attn_q.bias" in self.infos:
            config["attention_bias"] = True
        config["tie_word_embeddings"] = "output.weight" not in self.infos
        config.update(self.token_ids())
        return config

    def gpt2_config(self) -> dict:
        n_ctx = int(self.key("context_length"))
        n_embd = int(self.key("embedding_length"))
        config = {
            "model_type": "gpt2",
            "architectures": [self.names.hf_classes["gpt2"]],
            "vocab_size": self.vocab_size(),
            "n_layer": int(self.key("block_count")),
            "n_embd": n_embd,
            "n_head": int(self.key("attention.head_count")),
            "n_ctx": n_ctx,  # the key transformers' GGUF loader sets
            "layer_norm_epsilon": float(self.key("attention.layer_norm_epsilon")),
        }
        # what GPT2Config builds its shapes from: the position table's and the MLP's real sizes
        wpe = self.infos.get("position_embd.weight")
        config["n_positions"] = int(wpe.shape[0]) if wpe is not None else n_ctx
        up = self.infos.get("blk.0.ffn_up.weight")
        ff = up.shape[0] if up is not None else self.key("feed_forward_length", required=False, default=4 * n_embd)
        config["n_inner"] = int(ff)
        config["tie_word_embeddings"] = "output.weight" not in self.infos
        config.update(self.token_ids())
        return config
