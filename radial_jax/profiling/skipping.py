"""Oracle layer skipping (docs/design.md §3): simulate dynamic depth at a threshold.

Blocks are walked in order; for each token and block, ``f(x)`` is computed on
the current (already altered) stream, and the update is dropped (``y = x``)
when the block's ratio (``ratio_out`` by default) is below the threshold. The
rule itself lives in ``TransformerLayer.finish``, so the simulation is the
model's own forward pass with ``threshold=t`` (a traced scalar: one compile for
the whole sweep). A skipping token's K/V at that layer are still computed and
seen by later tokens (the oracle computed them anyway). ``ratio_out`` can exceed 1
(an update pointing against its input), so ``t = 1`` skips almost, not always, every block.

Per threshold: dynamic depth (active blocks per token out of ``2 L``: mean,
histogram, per layer), the fraction of block FLOPs kept (matmul FLOPs of
``LayerConfig.block_flops_per_token`` at the data's window length), and quality:
perplexity for language models (the windows' scored tokens), top-1 agreement
with the full model and final-embedding (class token) cosine for ViT.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from radial_jax.models.layer import RATIO_KINDS
from radial_jax.models.perplexity import TokenWeighted, token_nll
from radial_jax.profiling.plots import plot_simulation
from radial_jax.profiling.residual import as_batches, check_has_blocks
from radial_jax.reporting.files import atomic_write_text


def parse_thresholds(text: str, flag: str = "--thresholds") -> List[float]:
    """``"0,0.1,0.2"`` -> checked thresholds; a ValueError naming ``flag`` and the bad entry otherwise."""
    values = []
    for item in str(text).split(","):
        try:
            values.append(float(item))
        except ValueError:
            raise ValueError(f"{flag}: {item.strip()!r} is not a number; expected comma-separated values "
                             "in [0, 1], e.g. 0,0.1,0.2") from None
    return check_thresholds(values)


def check_thresholds(thresholds) -> List[float]:
    try:
        ts = [float(t) for t in np.atleast_1d(np.asarray(thresholds, np.float64))]
    except (TypeError, ValueError):
        raise ValueError(f"thresholds must be a non-empty list of values in [0, 1]; got {thresholds!r}") from None
    bad = [t for t in ts if not 0.0 <= t <= 1.0 or np.isnan(t)]
    if not ts or bad:
        raise ValueError(f"thresholds must be a non-empty list of values in [0, 1]; got {list(thresholds)}")
    return ts


_token_nll = jax.jit(token_nll)


@dataclasses.dataclass
class ThresholdResult:
    threshold: float
    mean_depth: float  # active blocks per token, out of 2L
    depth_fraction: float  # mean_depth / 2L
    depth_histogram: list  # counts of tokens with 0..2L active blocks
    per_layer_kept: dict  # {"attn": [L], "mlp": [L]}: fraction of tokens that keep the block
    flops_kept: float
    perplexity: Optional[float] = None
    top1_agreement: Optional[float] = None
    embedding_cosine: Optional[float] = None


@dataclasses.dataclass
class SimulationResult:
    model_name: str
    data_name: str
    ratio_kind: str
    num_layers: int
    tokens: int
    results: List[ThresholdResult]

    def to_dict(self) -> dict:
        return {"model": self.model_name, "data": self.data_name, "ratio": f"ratio_{self.ratio_kind}",
                "num_layers": self.num_layers, "blocks_per_token": 2 * self.num_layers, "tokens": self.tokens,
                "thresholds": [dataclasses.asdict(r) for r in self.results]}

    def table(self) -> str:
        quality = "perplexity" if self.results[0].perplexity is not None else "top1_agreement"
        lines = [f"oracle skipping, {self.model_name} on {self.data_name} (ratio_{self.ratio_kind}, "
                 f"{2 * self.num_layers} blocks)", f"{'threshold':>10}{'depth':>8}{'depth %':>9}{'FLOPs %':>9}"
                 f"{quality:>16}"]
        for r in self.results:
            lines.append(f"{r.threshold:>10.3f}{r.mean_depth:>8.2f}{100 * r.depth_fraction:>8.1f}%"
                         f"{100 * r.flops_kept:>8.1f}%{getattr(r, quality):>16.4f}")
        return "\n".join(lines)

    def save(self, out_dir) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "simulation.json", json.dumps(self.to_dict(), indent=1))
        plot_simulation(self, out / "simulation.png")
        return out


def simulate_skipping(model, data: Iterable, thresholds: Sequence[float], *, score_masks=None,
                      ratio_kind: str = "out", data_name: str = "data", progress: bool = True) -> SimulationResult:
    """Sweep oracle thresholds over ``data``.

    Args:
      data: batches as for ``profile``: ``(ids, attention_mask)`` or ``(ids, mask, score_mask)``
        for OPT (``score_mask`` marks the tokens whose prediction counts, e.g. from
        ``radial_jax.data.perplexity_windows``; default: every valid token after the first),
        pixel arrays for ViT.
      thresholds: values in [0, 1]; 0 reproduces the full model exactly.
    """
    thresholds = check_thresholds(thresholds)
    if ratio_kind not in RATIO_KINDS:
        raise ValueError(f"ratio_kind {ratio_kind!r} is unknown; allowed: {RATIO_KINDS}")
    check_has_blocks(model)
    data = list(data)
    scores = [d[2] if isinstance(d, tuple) and len(d) > 2 else None for d in data]
    batches = as_batches(model, [d[:2] if isinstance(d, tuple) else d for d in data])
    L = model.config.num_layers
    decoder = model.is_decoder
    lc = model.config.layer_config()
    reference = None
    if not decoder:  # the full model's predictions, for agreement and cosine
        reference = [model.forward(x, m) for x, m in batches]
    t_len = batches[0][0].shape[1] if decoder else reference[0].hidden.shape[1]
    flops = lc.block_flops_per_token(t_len)
    results, tokens = [], 0
    bar = tqdm(total=len(thresholds) * len(batches), desc=f"oracle {model.name}", unit="batch", disable=not progress)
    start = time.perf_counter()
    for t in thresholds:
        depth_counts = np.zeros(2 * L + 1, np.int64)
        kept = {"attn": np.zeros(L), "mlp": np.zeros(L)}
        n_tok = agree = cos_sum = 0.0
        scored = TokenWeighted()  # the windows' scored tokens
        for bi, ((x, mask), score) in enumerate(zip(batches, scores)):
            out = model.forward(x, mask, threshold=jnp.float32(t), ratio_kind=ratio_kind)
            valid = np.ones(np.asarray(out.stats.attn.keep).shape[1:], bool) if mask is None else mask
            k_attn = np.asarray(out.stats.attn.keep)[:, valid]  # [L, n]
            k_mlp = np.asarray(out.stats.mlp.keep)[:, valid]
            depth = k_attn.sum(0) + k_mlp.sum(0)
            depth_counts += np.bincount(depth, minlength=2 * L + 1)
            kept["attn"] += k_attn.sum(1)
            kept["mlp"] += k_mlp.sum(1)
            n_tok += valid.sum()
            if decoder:
                if score is None:
                    score = valid.copy()
                    score[:, 0] = False
                nll = np.asarray(_token_nll(out.logits, jnp.asarray(x)))
                scored.add(score.sum(), sums={"nll": nll[score].sum()})
            else:
                ref = reference[bi]
                if out.logits is not None:
                    agree += float((np.argmax(out.logits, -1) == np.argmax(ref.logits, -1)).sum())
                a, b = np.asarray(out.hidden[:, 0], np.float64), np.asarray(ref.hidden[:, 0], np.float64)
                cos_sum += float((np.sum(a * b, -1) / np.maximum(
                    np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)).sum())
            bar.update(1)
            bar.set_postfix(threshold=t, tokens_per_s=f"{(tokens + n_tok) / (time.perf_counter() - start):.0f}")
        tokens += n_tok
        mean_depth = float((np.arange(2 * L + 1) * depth_counts).sum() / n_tok)
        kept_flops = (kept["attn"].sum() * flops["attn"] + kept["mlp"].sum() * flops["mlp"])
        n_images = sum(x.shape[0] for x, _ in batches)
        results.append(ThresholdResult(
            threshold=t, mean_depth=mean_depth, depth_fraction=mean_depth / (2 * L),
            depth_histogram=depth_counts.tolist(),
            per_layer_kept={k: (v / n_tok).tolist() for k, v in kept.items()},
            flops_kept=float(kept_flops / (n_tok * L * (flops["attn"] + flops["mlp"]))),
            perplexity=scored.perplexity("nll") if decoder else None,
            top1_agreement=(agree / n_images if not decoder and reference[0].logits is not None else None),
            embedding_cosine=(cos_sum / n_images if not decoder else None)))
    bar.close()
    return SimulationResult(model.name, data_name, ratio_kind, L, int(tokens / len(thresholds)), results)
