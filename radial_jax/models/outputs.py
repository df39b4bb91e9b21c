"""Output containers shared by the model families."""
from __future__ import annotations

from typing import Optional

import flax.struct
import jax

from radial_jax.models.kv_cache import KVCache
from radial_jax.models.layer import LayerStats


@flax.struct.dataclass
class ModelOutput:
    logits: Optional[jax.Array]  # [b, t, vocab] (OPT) or [b, classes] (ViT classifier)
    hidden: jax.Array  # final hidden states after the final norm, [b, t, e]
    stats: LayerStats  # per-layer residual statistics, leaves [L, b, t]
    cache: Optional[KVCache] = None
    pooled: Optional[jax.Array] = None  # ViT pooler output, [b, e]
