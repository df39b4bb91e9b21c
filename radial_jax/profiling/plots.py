"""PNG plots of profiles and simulations (matplotlib, Agg backend, written atomically)."""
from __future__ import annotations

import numpy as np

from radial_jax.reporting.files import figure, integer_ticks, save_figure


def plot_profile(result, path) -> None:
    """Per-layer median ratio_out (p10-p90 band) of attention and MLP blocks; model-level histogram."""
    plt, fig, (ax, hx) = figure(2)
    layers = np.arange(result.num_layers)
    for group, color in (("attn", "tab:blue"), ("mlp", "tab:orange"), ("layer", "tab:gray")):
        s = [result.acc[("out", group, i)].summary() for i in layers]
        ax.plot(layers, [x["median"] for x in s], marker="o", color=color, label=f"{group} median")
        ax.fill_between(layers, [x["p10"] for x in s], [x["p90"] for x in s], color=color, alpha=0.15)
    ax.set(xlabel="layer", ylabel="ratio_out = |f(x)| / |x + f(x)|", yscale="log",
           title=f"{result.model_name}: residual ratio per layer")
    integer_ticks(ax.xaxis)
    ax.legend(fontsize=8)
    h = result.acc[("out", "blocks", "all")].coarse_histogram(20)
    if h["counts"]:
        edges = np.asarray(h["edges"])
        hx.bar(edges[:-1], h["counts"], width=np.diff(edges), align="edge", color="tab:green")
    hx.axvline(result.median, color="k", linestyle="--", label=f"median {result.median:.3f}")
    hx.set(xscale="log", xlabel="ratio_out (attention and MLP blocks)", ylabel="tokens x blocks",
           title=f"{result.data_name}: {result.tokens:,} tokens")
    hx.legend(fontsize=8)
    save_figure(plt, fig, path)


def plot_simulation(sim, path) -> None:
    """Dynamic depth and quality against the oracle threshold."""
    plt, fig, (ax, qx) = figure(2)
    t = [r.threshold for r in sim.results]
    ax.plot(t, [100 * r.depth_fraction for r in sim.results], marker="o", label="depth (% of blocks)")
    ax.plot(t, [100 * r.flops_kept for r in sim.results], marker="s", label="block FLOPs kept (%)")
    ax.set(xlabel=f"threshold on ratio_{sim.ratio_kind}", ylabel="%", title=f"{sim.model_name}: dynamic depth")
    ax.legend(fontsize=8)
    if sim.results[0].perplexity is not None:
        qx.plot(t, [r.perplexity for r in sim.results], marker="o", color="tab:red")
        qx.set(ylabel="perplexity", yscale="log")
    else:
        qx.plot(t, [r.embedding_cosine for r in sim.results], marker="o", label="final-embedding cosine")
        if sim.results[0].top1_agreement is not None:
            qx.plot(t, [r.top1_agreement for r in sim.results], marker="s", label="top-1 agreement")
        qx.legend(fontsize=8)
    qx.set(xlabel=f"threshold on ratio_{sim.ratio_kind}", title=f"quality on {sim.data_name}")
    save_figure(plt, fig, path)
