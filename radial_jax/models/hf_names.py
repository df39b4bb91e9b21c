"""Hugging Face tensor names -> our parameter paths: one table per model family.

Each rule maps one HF tensor (``{i}`` = layer index) to one of our parameter
paths and says how to convert it: ``linear`` (torch ``[out, in]`` -> flax
``[in, out]``), ``conv`` (torch ``[out, in, kh, kw]`` -> flax ``[kh, kw, in, out]``)
or ``copy``. Rules for parameters a given config does not have are simply not
used: which of our parameters exist is decided by the module itself.
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str
    ours: tuple
    transform: str = "copy"


@dataclasses.dataclass(frozen=True)
class FamilyNames:
    strip_prefixes: tuple  # HF base-model prefixes that may or may not be present
    rules: tuple  # non-layer tensors
    layer_rules: tuple  # per-layer tensors, stacked along our leading layer axis
    ignorable: tuple = ()  # HF tensors we knowingly do not use (prefix-stripped names)

    def normalise(self, name: str) -> str:
        for prefix in self.strip_prefixes:
            if name.startswith(prefix):
                return name[len(prefix):]
        return name


def _linear(hf, *ours):
    return (Rule(f"{hf}.weight", (*ours, "kernel"), "linear"), Rule(f"{hf}.bias", (*ours, "bias")))


def _norm(hf, *ours):
    return (Rule(f"{hf}.weight", (*ours, "scale")), Rule(f"{hf}.bias", (*ours, "bias")))


OPT_NAMES = FamilyNames(
    strip_prefixes=("model.",),
    rules=(
        Rule("decoder.embed_tokens.weight", ("embed_tokens", "embedding")),
        Rule("decoder.embed_positions.weight", ("embed_positions", "embedding")),
        Rule("decoder.project_in.weight", ("project_in", "kernel"), "linear"),
        Rule("decoder.project_out.weight", ("project_out", "kernel"), "linear"),
        *_norm("decoder.final_layer_norm", "final_layer_norm"),
        Rule("lm_head.weight", ("lm_head", "kernel"), "linear"),
    ),
    layer_rules=(
        *_linear("decoder.layers.{i}.self_attn.q_proj", "q_proj"),
        *_linear("decoder.layers.{i}.self_attn.k_proj", "k_proj"),
        *_linear("decoder.layers.{i}.self_attn.v_proj", "v_proj"),
        *_linear("decoder.layers.{i}.self_attn.out_proj", "out_proj"),
        *_norm("decoder.layers.{i}.self_attn_layer_norm", "attn_norm"),
        *_linear("decoder.layers.{i}.fc1", "fc1"),
        *_linear("decoder.layers.{i}.fc2", "fc2"),
        *_norm("decoder.layers.{i}.final_layer_norm", "mlp_norm"),
    ),
    ignorable=("lm_head.weight",),  # a copy of embed_tokens when the head is tied
)

VIT_NAMES = FamilyNames(
    strip_prefixes=("vit.",),
    rules=(
        Rule("embeddings.cls_token", ("cls_token",)),
        Rule("embeddings.position_embeddings", ("position_embeddings",)),
        Rule("embeddings.patch_embeddings.projection.weight", ("patch_embed", "kernel"), "conv"),
        Rule("embeddings.patch_embeddings.projection.bias", ("patch_embed", "bias")),
        *_norm("layernorm", "final_norm"),
        *_linear("pooler.dense", "pooler"),
        *_linear("classifier", "classifier"),
    ),
    layer_rules=(
        *_linear("encoder.layer.{i}.attention.attention.query", "q_proj"),
        *_linear("encoder.layer.{i}.attention.attention.key", "k_proj"),
        *_linear("encoder.layer.{i}.attention.attention.value", "v_proj"),
        *_linear("encoder.layer.{i}.attention.output.dense", "out_proj"),
        *_norm("encoder.layer.{i}.layernorm_before", "attn_norm"),
        *_linear("encoder.layer.{i}.intermediate.dense", "fc1"),
        *_linear("encoder.layer.{i}.output.dense", "fc2"),
        *_norm("encoder.layer.{i}.layernorm_after", "mlp_norm"),
    ),
    # mask_token is for masked-image pretraining; pooler/classifier of the other head type.
    ignorable=("embeddings.mask_token", "pooler.dense.weight", "pooler.dense.bias",
               "classifier.weight", "classifier.bias"),
)

NAMES = {"opt": OPT_NAMES, "vit": VIT_NAMES}


def convert(array: np.ndarray, transform: str) -> np.ndarray:
    if transform == "linear":
        return array.T
    if transform == "conv":
        return array.transpose(2, 3, 1, 0)
    return array
