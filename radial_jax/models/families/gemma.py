"""Gemma 2 and Gemma 3 (google/gemma-2-*, google/gemma-3-*): config, Hugging Face names, family entry.

One config for both generations, told apart by ``model_type`` (the checkpoint's own:
``"gemma2"``, ``"gemma3_text"``, or ``"gemma3"`` for the multimodal 4B+ checkpoints,
of which only the text model is loaded). What the layers do:

* RMSNorm with scale ``1 + w`` (float32), before *and after* each block (the
  post-norm output is what is added to the residual stream), a final norm;
* GeGLU MLP (``hidden_activation``, ``gelu_pytorch_tanh``), no biases;
  grouped-query attention with an explicit ``head_dim``, scores scaled by
  ``query_pre_attn_scalar ** -0.5``;
* local (``"sliding_attention"``, window ``sliding_window``) and global
  (``"full_attention"``) layers (``layer_types``), each kind with its own RoPE
  table (Gemma 3: local theta 1e4, global theta 1e6 with linear scaling on 4B+);
* Gemma 2: attention-score and final-logit soft-capping (tanh);
  Gemma 3: RMSNorm (``1 + w``) of queries and keys over the head dimension;
* token embeddings times ``sqrt(hidden_size)`` (in the compute dtype), tied LM head.

Both config formats are read: transformers >= 5 (``rope_parameters``, per layer
type for Gemma 3; ``layer_types``) and the older one of the hub checkpoints
(``rope_theta``, ``rope_local_base_freq``, ``rope_scaling``,
``sliding_window_pattern``; no ``layer_types``: Gemma 2 alternates local, global
starting with a local layer; Gemma 3 has one global layer every
``sliding_window_pattern``). Values a config leaves out are transformers' defaults
for its ``model_type`` (the multimodal checkpoints' ``text_config`` lists only
what differs from them).

Two settings are ignored because transformers ignores them, so that a checkpoint
computes what it computes there: ``attn_logit_softcapping`` of Gemma 3 (its
attention never passes it on) and ``final_logit_softcapping`` of the multimodal
Gemma 3 (``Gemma3ForConditionalGeneration`` does not apply it).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Optional, Union

from radial_jax.models.decoder import CausalLM, DecoderSpec
from radial_jax.models.config_base import DecoderConfig
from radial_jax.models.family import Family
from radial_jax.models.layer import LayerConfig
from radial_jax.models.names import GGUF_DECODER_BLOCK, FamilyNames, GGUFNames, Rule, linear, norm
from radial_jax.models.rope import RoPE
from radial_jax.models.stack import layer_meta

MODEL_TYPES = ("gemma2", "gemma3_text", "gemma3")
LAYER_TYPES = ("full_attention", "sliding_attention")  # a layer's RoPE table is its type's index here

# transformers' Gemma2Config / Gemma3TextConfig defaults, for the values a config.json leaves out.
HF_DEFAULTS = {
    "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh",
                   max_position_embeddings=8192, rms_norm_eps=1e-6, attention_bias=False, query_pre_attn_scalar=256,
                   sliding_window=4096, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                   tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=1),
    "gemma3_text": dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                        hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131072, rms_norm_eps=1e-6,
                        attention_bias=False, query_pre_attn_scalar=256, sliding_window=4096,
                        final_logit_softcapping=None, attn_logit_softcapping=None, tie_word_embeddings=True,
                        pad_token_id=0, bos_token_id=2, eos_token_id=1),
}
DEFAULT_THETA = {"gemma2": {"full_attention": 10000.0, "sliding_attention": 10000.0},
                 "gemma3_text": {"full_attention": 1_000_000.0, "sliding_attention": 10000.0}}
DEFAULT_PATTERN = {"gemma2": 2, "gemma3_text": 6}  # one global layer every N (the N-th, 2N-th, ...)
TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")


def _kind(model_type: str) -> str:
    """``"gemma2"`` or ``"gemma3_text"``: the text architecture of a Gemma ``model_type``."""
    return "gemma2" if model_type == "gemma2" else "gemma3_text"


def default_layer_types(model_type: str, num_layers: int, pattern: Optional[int] = None) -> tuple:
    """transformers' layer types when a config has none: every ``pattern``-th layer global, the others local."""
    pattern = DEFAULT_PATTERN[_kind(model_type)] if pattern is None else pattern
    if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 1:
        raise ValueError(f"sliding_window_pattern must be an integer >= 1, got {pattern!r}")
    return tuple("sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers))


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _rope(value, what: str) -> RoPE:
    """A ``RoPE`` from a ``RoPE``, its ``dataclasses.asdict`` or an HF rope-parameters dict."""
    if isinstance(value, RoPE):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a RoPE or a dict of HF rope parameters, got {value!r}")
    if "theta" in value or "scaling" in value:  # our own field names (a config saved with dataclasses.asdict)
        try:
            return RoPE(**value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{what} = {value}: {e}") from e
    prf = value.get("partial_rotary_factor")
    if prf is not None and prf != 1.0:
        raise ValueError(f"{what}: partial_rotary_factor {prf} is not supported; supported: 1.0 (rotate the whole "
                         "head dimension)")
    try:
        return RoPE.from_hf(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} = {value}: {e}") from e


@dataclasses.dataclass(frozen=True)
class GemmaConfig(DecoderConfig):
    """A Gemma 2 / Gemma 3 text model (Hugging Face field names).

    The defaults are transformers' ``Gemma3TextConfig`` defaults; ``from_hf`` uses
    the defaults of the checkpoint's own ``model_type``. ``layer_types`` and
    ``rope_parameters`` left as ``None`` take the ``model_type``'s defaults;
    ``rope_parameters`` maps each layer type to a ``RoPE`` (or an HF dict of rope
    parameters) and is stored as ``((layer_type, RoPE), ...)``.
    """

    model_type: str = "gemma3_text"
    vocab_size: int = 262208
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4  # grouped-query attention: 2 query heads share a key/value head
    head_dim: int = 256  # its own size: not hidden_size // num_attention_heads in Gemma
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    query_pre_attn_scalar: float = 256
    sliding_window: Optional[int] = 4096  # keys a local layer's query sees, itself included
    layer_types: Optional[tuple] = None  # "sliding_attention" / "full_attention" per layer
    rope_parameters: Union[None, dict, tuple] = None
    final_logit_softcapping: Optional[float] = None
    attn_logit_softcapping: Optional[float] = None
    tie_word_embeddings: bool = True
    pad_token_id: Optional[int] = 0
    bos_token_id: Optional[int] = 2
    eos_token_id: Union[None, int, tuple] = 1

    MODEL_TYPES = MODEL_TYPES
    POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings")
    ACTIVATION_FIELD = "hidden_activation"

    def __post_init__(self):
        self.check()
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"GemmaConfig.num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads} (grouped-query attention)")
        if not _positive(self.query_pre_attn_scalar):  # rms_norm_eps: check() (a norm's epsilon)
            raise ValueError(f"GemmaConfig.query_pre_attn_scalar must be a number > 0, got "
                             f"{self.query_pre_attn_scalar!r}")
        for name in ("final_logit_softcapping", "attn_logit_softcapping"):
            value = getattr(self, name)
            if value is not None and not _positive(value):
                raise ValueError(f"GemmaConfig.{name} must be None (no soft-capping) or a number > 0, got {value!r}")

        types = self.layer_types
        if types is None:
            types = default_layer_types(self.model_type, self.num_hidden_layers)
        types = tuple(types)
        if len(types) != self.num_hidden_layers:
            raise ValueError(f"GemmaConfig.layer_types has {len(types)} entries for {self.num_hidden_layers} layers "
                             "(num_hidden_layers); give one per layer")
        unknown = sorted(set(types) - set(LAYER_TYPES))
        if unknown:
            raise ValueError(f"GemmaConfig.layer_types {unknown} are not supported; supported: {LAYER_TYPES}")
        object.__setattr__(self, "layer_types", types)
        if "sliding_attention" in types:
            w = self.sliding_window
            if isinstance(w, bool) or not isinstance(w, int) or w < 1:
                raise ValueError(f"GemmaConfig.sliding_window must be an integer >= 1 when some layer is "
                                 f"'sliding_attention', got {w!r}")

        ropes = self.rope_parameters
        if ropes is None:
            theta = DEFAULT_THETA[_kind(self.model_type)]
            ropes = {t: RoPE(theta=theta[t]) for t in LAYER_TYPES}
        ropes = dict(ropes)
        missing = [t for t in LAYER_TYPES if t not in ropes]
        extra = sorted(set(ropes) - set(LAYER_TYPES))
        if missing or extra:
            raise ValueError(f"GemmaConfig.rope_parameters must give one RoPE per layer type {LAYER_TYPES}; "
                             f"missing {missing}, unknown {extra}")
        object.__setattr__(self, "rope_parameters",
                           tuple((t, _rope(ropes[t], f"GemmaConfig.rope_parameters[{t!r}]")) for t in LAYER_TYPES))
        self.layer_config()  # heads / kv heads / head_dim checks

    @classmethod
    def from_hf(cls, hf: dict) -> "GemmaConfig":
        """From a Hugging Face ``config.json`` dict (either format; see the module docstring)."""
        model_type = hf.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not a Gemma 2/3 model; supported: {MODEL_TYPES}")
        text = hf
        if model_type == "gemma3":  # multimodal: the text model is described by text_config
            text = hf.get("text_config") or {}
            if not isinstance(text, dict):
                raise ValueError(f"text_config must be an object, got {type(text).__name__}")
            if text.get("model_type", "gemma3_text") != "gemma3_text":
                raise ValueError(f"text_config.model_type {text['model_type']!r} is not supported; supported: "
                                 "'gemma3_text'")
            # Token ids of older multimodal configs live at the top level only.
            text = {**{k: hf[k] for k in TOKEN_IDS if k in hf}, **text}
        kind = _kind(model_type)
        if text.get("use_bidirectional_attention"):
            raise ValueError("use_bidirectional_attention=True is not supported; supported: causal attention "
                             "(false / null)")
        names = {f.name for f in dataclasses.fields(cls)} - {"model_type", "layer_types", "rope_parameters"}
        kwargs = {**HF_DEFAULTS[kind], **{k: v for k, v in text.items() if k in names}}
        kwargs["layer_types"] = text.get("layer_types")
        if kwargs["layer_types"] is None and isinstance(kwargs["num_hidden_layers"], int):  # else: __post_init__ says
            pattern = text.get("sliding_window_pattern") if kind == "gemma3_text" else None  # Gemma 2: alternating
            kwargs["layer_types"] = default_layer_types(model_type, kwargs["num_hidden_layers"], pattern)
        kwargs["rope_parameters"] = cls._rope_parameters_from_hf(kind, text, kwargs["max_position_embeddings"])
        if kind == "gemma3_text":
            kwargs["attn_logit_softcapping"] = None  # transformers' Gemma 3 attention does not apply it
        if model_type == "gemma3":
            kwargs["final_logit_softcapping"] = None  # nor does Gemma3ForConditionalGeneration's head
        return cls(model_type=model_type, **kwargs)

    @staticmethod
    def _rope_parameters_from_hf(kind: str, hf: dict, max_positions: int) -> dict:
        """``{layer_type: HF rope dict}`` as transformers reads either config format."""
        given = copy.deepcopy(hf.get("rope_parameters")) or {}
        if not isinstance(given, dict):
            raise ValueError(f"rope_parameters must be an object, got {given!r}")
        nested = bool(given) and set(given) <= set(LAYER_TYPES)
        scaling = copy.deepcopy(hf.get("rope_scaling"))
        if scaling is not None and not isinstance(scaling, dict):
            raise ValueError(f"rope_scaling must be an object or null, got {scaling!r}")
        theta = DEFAULT_THETA[kind]
        if kind == "gemma2":  # one table for every layer
            if nested:
                params = {t: dict(given.get(t) or {}) for t in LAYER_TYPES}
            else:
                one = scaling or given
                params = {t: dict(one) for t in LAYER_TYPES}
            for p in params.values():
                p.setdefault("rope_theta", hf.get("rope_theta", theta["full_attention"]))
        else:
            if given and not nested:
                raise ValueError(f"rope_parameters of a Gemma 3 must be keyed by layer type {LAYER_TYPES}; got keys "
                                 f"{sorted(given)}")
            params = {t: dict(given.get(t) or {"rope_type": "default"}) for t in LAYER_TYPES}
            if scaling:  # the older format's rope_scaling is the global layers'
                params["full_attention"].update(scaling)
            params["full_attention"].setdefault("rope_theta", hf.get("rope_theta", theta["full_attention"]))
            params["sliding_attention"].setdefault("rope_theta",
                                                   hf.get("rope_local_base_freq", theta["sliding_attention"]))
        for p in params.values():
            if p.get("rope_type", p.get("type")) == "llama3":
                p.setdefault("original_max_position_embeddings", max_positions)
        return params

    # -- the family protocol ----------------------------------------------------------------------
    @property
    def is_gemma3(self) -> bool:
        return _kind(self.model_type) == "gemma3_text"

    def rope(self, layer_type: str) -> RoPE:
        return dict(self.rope_parameters)[layer_type]

    def layer_config(self) -> LayerConfig:
        return LayerConfig(
            hidden_size=self.hidden_size, num_heads=self.num_attention_heads, ffn_dim=self.intermediate_size,
            num_kv_heads=self.num_key_value_heads, head_dim=self.head_dim, activation=self.hidden_activation,
            gated_mlp=True, norm="rmsnorm", norm_eps=self.rms_norm_eps, rms_offset=1.0, pre_norm=True,
            post_block_norm=True, qk_norm=self.is_gemma3, qkv_bias=self.attention_bias,
            out_bias=self.attention_bias, mlp_bias=False, attn_scale=float(self.query_pre_attn_scalar) ** -0.5,
            attn_softcap=self.attn_logit_softcapping, ropes=tuple(self.rope(t) for t in LAYER_TYPES))

    def layer_meta(self) -> dict:
        windows = [self.sliding_window if t == "sliding_attention" else 0 for t in self.layer_types]
        return layer_meta(windows, [LAYER_TYPES.index(t) for t in self.layer_types])

    def decoder_spec(self) -> DecoderSpec:
        return DecoderSpec(embed_dim=self.hidden_size, embed_scale=self.hidden_size ** 0.5, final_norm=True,
                           tie_embeddings=self.tie_word_embeddings,
                           final_logit_softcap=self.final_logit_softcapping)


# Tensor names, prefix stripped: Gemma2/3ForCausalLM ("model."), the multimodal checkpoints as saved
# ("language_model.model.", "language_model.lm_head") and as transformers >= 4.52 names them in memory
# ("model.language_model.", "lm_head"); their vision tower and projector are not used.
NAMES = FamilyNames(
    strip_prefixes=("model.language_model.", "language_model.model.", "language_model.", "model."),
    rules=(
        Rule("embed_tokens.weight", ("embed_tokens", "embedding")),
        *norm("norm", "final_norm"),
        Rule("lm_head.weight", ("lm_head", "kernel"), "linear"),
    ),
    layer_rules=(
        *linear("layers.{i}.self_attn.q_proj", "q_proj"),
        *linear("layers.{i}.self_attn.k_proj", "k_proj"),
        *linear("layers.{i}.self_attn.v_proj", "v_proj"),
        *linear("layers.{i}.self_attn.o_proj", "out_proj"),
        *norm("layers.{i}.self_attn.q_norm", "q_norm"),
        *norm("layers.{i}.self_attn.k_norm", "k_norm"),
        *norm("layers.{i}.input_layernorm", "attn_norm"),
        *norm("layers.{i}.post_attention_layernorm", "attn_post_norm"),
        *norm("layers.{i}.pre_feedforward_layernorm", "mlp_norm"),
        *norm("layers.{i}.post_feedforward_layernorm", "mlp_post_norm"),
        *linear("layers.{i}.mlp.up_proj", "fc1", bias=False),
        *linear("layers.{i}.mlp.gate_proj", "gate", bias=False),
        *linear("layers.{i}.mlp.down_proj", "fc2", bias=False),
    ),
    ignorable=("lm_head.weight",),  # a copy of embed_tokens when the head is tied
    ignorable_prefixes=("vision_tower.", "multi_modal_projector."),
)

GGUF_GEMMA2_BLOCK = {**GGUF_DECODER_BLOCK, "post_attention_norm": "post_attention_layernorm",
                     "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
GGUF = (GGUFNames("gemma2", {"gemma2": "Gemma2ForCausalLM"}, GGUF_GEMMA2_BLOCK, norm_offset=1.0),
        GGUFNames("gemma3", {"gemma3_text": "Gemma3ForCausalLM"},
                  {**GGUF_GEMMA2_BLOCK, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"},
                  norm_offset=1.0))

FAMILY = Family(name="gemma", model_types=MODEL_TYPES, config_cls=GemmaConfig, module_cls=CausalLM, names=NAMES,
                gguf=GGUF)
