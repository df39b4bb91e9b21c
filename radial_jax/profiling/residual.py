"""Residual-ratio profiling (docs/design.md §2).

For every token and every residual block ``y = x + f(x)`` (attention, MLP, and
the whole layer as one block), two ratios of per-token L2 norms:

* ``ratio_out = |f(x)| / |x + f(x)|``: the block's share of its output (**default**);
* ``ratio_in  = |f(x)| / |x|``: the block's relative change of its input.

The norms come out of the model's own forward pass (``Model.forward`` returns
them in ``stats``; the LM head is not computed), one jitted pass per batch.
Padding never counts. Statistics per block type (``attn``, ``mlp``, ``layer``,
and ``blocks`` = attention and MLP blocks together, the paper's "residual
blocks"), per layer and per model: median, mean, p10, p90 and a histogram,
exact while the values fit ``exact_limit``, else from the mergeable sketch of
``radial_jax.profiling.stats`` with its error bound stated in the output.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from radial_jax.defaults import RATIO
from radial_jax.models.layer import RATIO_KINDS
from radial_jax.profiling.plots import plot_profile
from radial_jax.profiling.stats import SKETCH_RELATIVE_ERROR, RatioAccumulator, histogram_bins
from radial_jax.reporting.files import atomic_write_text

BLOCKS = ("attn", "mlp", "layer")
GROUPS = BLOCKS + ("blocks",)  # "blocks": attention and MLP blocks pooled
DEFAULT_RATIO = RATIO
RATIO_NAMES = {"out": "ratio_out = |f(x)| / |x + f(x)|", "in": "ratio_in = |f(x)| / |x|"}


def as_batches(model, data) -> List[tuple]:
    """Normalise ``data`` to a list of ``(inputs, attention_mask or None)``; empty data is an error.

    Accepted: for decoders, ``(ids[n, t], mask[n, t])`` pairs or dicts with
    ``input_ids``/``attention_mask``; for ViT, ``pixel_values`` arrays.
    """
    batches = []
    for item in data:
        if isinstance(item, dict):
            item = (item.get("input_ids", item.get("pixel_values")), item.get("attention_mask"))
        elif not isinstance(item, tuple):
            item = (item, None)
        inputs, mask = item[0], item[1] if len(item) > 1 else None
        model.check_inputs(np.asarray(inputs), None if mask is None else np.asarray(mask))
        batches.append((np.asarray(inputs), None if mask is None else np.asarray(mask, bool)))
    if not batches:
        raise ValueError("no data to profile: the data source produced no batches")
    if all(mask is not None and not mask.any() for _, mask in batches):
        raise ValueError("no token to profile: every attention_mask is all 0 (every token is padding)")
    return batches


def token_mask(mask, shape_bt) -> np.ndarray:
    """``[b, t]``: the tokens that count: not padding (every patch and the class token of an image)."""
    return np.ones(shape_bt, bool) if mask is None else np.asarray(mask, bool)


def check_has_blocks(model) -> None:
    if getattr(model.config, "num_layers", 0) < 1:
        raise ValueError(f"{model.name} has no residual blocks (num_layers={model.config.num_layers}); "
                         "nothing to profile")


@jax.jit
def _ratios(stats):
    """``[block, kind, L, b, t]`` ratios from the per-token norms of ``LayerStats``."""
    return jnp.stack([jnp.stack([getattr(stats, blk).ratio(kind) for kind in RATIO_KINDS]) for blk in BLOCKS])


@dataclasses.dataclass
class ProfileResult:
    """Accumulators per ``(kind, group, layer)``; ``layer`` is an index or ``"all"``."""

    model_name: str
    data_name: str
    num_layers: int
    num_params: int
    tokens: int
    seconds: float
    acc: Dict[tuple, RatioAccumulator]
    raw: Optional[Dict[str, np.ndarray]] = None

    def stat(self, name: str = "median", kind: str = DEFAULT_RATIO, group: str = "blocks", layer="all") -> float:
        s = self.acc[(kind, group, layer)].summary()
        return s[name]

    @property
    def median(self) -> float:
        """The headline number: median ratio_out over all residual blocks and tokens."""
        return self.stat()

    def to_dict(self) -> dict:
        ratios = {}
        for kind in RATIO_KINDS:
            ratios[kind] = {"definition": RATIO_NAMES[kind]}
            for group in GROUPS:
                all_ = self.acc[(kind, group, "all")]
                ratios[kind][group] = {
                    "model": {**all_.summary(), "histogram": all_.coarse_histogram()},
                    "per_layer": [self.acc[(kind, group, i)].summary() for i in range(self.num_layers)],
                }
        return {
            "model": self.model_name, "data": self.data_name, "num_params": self.num_params,
            "num_layers": self.num_layers, "tokens": self.tokens, "seconds": self.seconds,
            "default_ratio": "ratio_out", "ratio_definitions": RATIO_NAMES,
            "median_ratio_out": self.median, "median_ratio_in": self.stat(kind="in"),
            "sketch_relative_error_bound": SKETCH_RELATIVE_ERROR, "ratios": ratios,
        }

    def table(self) -> str:
        """A short text summary (the default ratio first)."""
        lines = [f"{self.model_name} on {self.data_name}: {self.tokens:,} tokens, {self.num_layers} layers "
                 f"(default: ratio_out; exact={self.acc[('out', 'blocks', 'all')].exact})",
                 f"{'ratio':<10}{'group':<8}{'median':>9}{'mean':>9}{'p10':>9}{'p90':>9}"]
        for kind in RATIO_KINDS:
            for group in GROUPS:
                s = self.acc[(kind, group, "all")].summary()
                lines.append(f"{'ratio_' + kind:<10}{group:<8}{s['median']:>9.4f}{s['mean']:>9.4f}"
                             f"{s['p10']:>9.4f}{s['p90']:>9.4f}")
        return "\n".join(lines)

    def save(self, out_dir) -> Path:
        """``profile.json``, ``per_layer.csv``, ``per_layer.png`` (and ``raw.npz``), each written atomically."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "profile.json", json.dumps(self.to_dict(), indent=1))
        rows = [["ratio", "group", "layer", "median", "mean", "p10", "p90", "count"]]
        for kind in RATIO_KINDS:
            for group in GROUPS:
                for i in range(self.num_layers):
                    s = self.acc[(kind, group, i)].summary()
                    rows.append([f"ratio_{kind}", group, i, s["median"], s["mean"], s["p10"], s["p90"], s["count"]])
        atomic_write_text(out / "per_layer.csv", _csv(rows))
        if self.raw is not None:
            with tempfile.NamedTemporaryFile(dir=out, suffix=".npz", delete=False) as f:
                np.savez_compressed(f, **self.raw)
            os.replace(f.name, out / "raw.npz")
        plot_profile(self, out / "per_layer.png")
        return out


def _csv(rows) -> str:
    import io
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue()


def profile(model, data: Iterable, *, data_name: str = "data", exact_limit: int = 5_000_000,
            keep_raw: bool = False, progress: bool = True) -> ProfileResult:
    """Profile the residual ratios of ``model`` (a ``radial_jax.Model``) over ``data``.

    Args:
      data: batches (see ``as_batches``); all are checked before the first forward.
      exact_limit: per accumulator, the number of values kept for exact quantiles.
      keep_raw: also return (and ``save``) the raw per-token values, ``[block][kind]
        -> [layers, tokens]`` arrays keyed ``"attn_out"``, ``"mlp_in"``, ...
    """
    check_has_blocks(model)
    batches = as_batches(model, data)
    L = model.config.num_layers
    acc, raw = new_accumulators(L, exact_limit, keep_raw)
    tokens, start = 0, time.perf_counter()
    bar = tqdm(batches, desc=f"profile {model.name}", unit="batch", disable=not progress)
    for inputs, mask in bar:
        out = model.forward(inputs, mask, compute_logits=False)
        valid = token_mask(mask, out.stats.attn.x.shape[1:])
        accumulate(acc, raw, np.asarray(_ratios(out.stats)), valid, range(L))
        tokens += int(valid.sum())
        bar.set_postfix(tokens_per_s=f"{tokens / (time.perf_counter() - start):.0f}")
    return ProfileResult(model.name, data_name, L, model.num_params, tokens, time.perf_counter() - start, acc,
                         finish_raw(raw))


def new_accumulators(num_layers: int, exact_limit: int, keep_raw: bool):
    acc = {(k, g, l): RatioAccumulator(exact_limit)
           for k in RATIO_KINDS for g in GROUPS for l in [*range(num_layers), "all"]}
    raw = {f"{b}_{k}": [[] for _ in range(num_layers)] for b in BLOCKS for k in RATIO_KINDS} if keep_raw else None
    return acc, raw


def accumulate(acc, raw, ratios, valid, layers) -> None:
    """Add ``ratios[block, kind, len(layers), b, t]`` of the ``valid`` tokens to the accumulators."""
    vals = np.asarray(ratios[..., valid], np.float64)  # [block, kind, layers, n]
    bins = histogram_bins(vals)  # once: each value goes to two to four accumulators
    for bi, blk in enumerate(BLOCKS):
        for ki, kind in enumerate(RATIO_KINDS):
            for li, layer in enumerate(layers):
                v, b = vals[bi, ki, li], bins[bi, ki, li]
                groups = (blk, "blocks") if blk != "layer" else (blk,)
                for g in groups:
                    acc[(kind, g, layer)].add(v, b)
                    acc[(kind, g, "all")].add(v, b)
                if raw is not None:
                    raw[f"{blk}_{kind}"][layer].append(v)


def finish_raw(raw):
    """Raw values as ``[layers, tokens]`` arrays (tokens in data order)."""
    if raw is None:
        return None
    return {k: np.stack([np.concatenate(per_layer) for per_layer in v]) for k, v in raw.items()}
