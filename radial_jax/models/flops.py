"""FLOPs by construction from the shapes that run: the one place compute is counted.

Counts are matrix-multiply FLOPs (2 per multiply-add), the convention of MFU
figures: projections, MLP, attention scores and context, the router MLP and the
LM head. Norms, activations, softmax and gathers are left out (they are a few
percent of a layer at real widths; ``tests/test_flops.py`` compares these counts
with XLA's ``cost_analysis`` of the compiled computations).

Attention is counted over the key slots that are actually computed against:
``n_keys`` is the length of the key array (the whole cache for a cached call,
masked slots included, since masking does not skip the arithmetic).
"""
from __future__ import annotations

from radial_jax.models.layer import LayerConfig


def layer_flops(lc: LayerConfig, n_tokens, n_keys) -> float:
    """One layer on ``n_tokens`` queries against ``n_keys`` key slots."""
    e, f, d = lc.hidden_size, lc.ffn_dim, lc.head_size
    q, kv = lc.num_heads * d, lc.kv_heads * d
    per_token = 2 * (e * q + 2 * e * kv + q * e) + 2 * (3 if lc.gated_mlp else 2) * e * f + 2 * 2 * n_keys * q
    return float(n_tokens) * per_token


def kv_flops(lc: LayerConfig, n_tokens) -> float:
    """The K and V projections of ``n_tokens`` (a *propagate* cache write)."""
    return float(n_tokens) * lc.kv_flops_per_token()


def router_flops(hidden_size: int, router_hidden: int, num_choices: int, n_tokens) -> float:
    """The router MLP (``hidden -> router_hidden -> num_choices``) on ``n_tokens``."""
    return float(n_tokens) * 2 * (hidden_size * router_hidden + router_hidden * num_choices)


def head_flops(config, n_tokens) -> float:
    """The LM head (and OPT-350M's output projection) on ``n_tokens`` final hidden states."""
    spec = config.decoder_spec()
    proj = 2 * config.hidden_size * spec.embed_dim if spec.embed_dim != config.hidden_size else 0
    return float(n_tokens) * (2 * spec.embed_dim * config.vocab_size + proj)


def dense_flops(config, n_tokens, n_keys, with_head: bool = True) -> float:
    """The sequential model: every token through every layer (and the head)."""
    total = config.num_layers * layer_flops(config.layer_config(), n_tokens, n_keys)
    return total + (head_flops(config, n_tokens) if with_head and hasattr(config, "decoder_spec") else 0.0)


def step_cost_in_visits(lc: LayerConfig, hidden_size: int, router_hidden: int, num_layers: int, n_keys,
                        propagate: bool) -> float:
    """What a token costs at a step it is active, beyond any layer it visits (the router, and the
    *propagate* K/V write), in units of one layer visit against ``n_keys`` keys."""
    extra = router_flops(hidden_size, router_hidden, num_layers + 2, 1) + (kv_flops(lc, 1) if propagate else 0.0)
    return extra / layer_flops(lc, 1, n_keys)
