"""What the routes do, for a researcher to see: per-step shares, reuse, exits, depth, drops; JSON and plots.

``RouteStats`` accumulates over forwards (``add(out.router, valid)``) and
summarises, over the valid tokens:

* ``step_share[S, L + 3]``: per step, the share of tokens that went through each
  layer, that stayed (chose *skip*, or wanted a layer and were dropped by the
  budget), that exited, and that were no longer active (exited earlier) — each
  row sums to 1 (more with expert choice, which may send a token to several layers);
* ``wanted_share[S, L]`` and ``dropped_share[S]``: what the router asked for, and
  what the budget refused;
* reuse: ``reuse_token_share`` (tokens that visited some layer twice or more) and
  ``reuse_visits`` (visits beyond the first to a layer);
* exits: ``exit_share`` (tokens that exited before the last step: an exit at the
  last step changes nothing, it is a skip) and ``exits_by_step[S]`` (every step's);
* ``depth_histogram[S + 1]`` (tokens with 0 .. S layer visits) and ``mean_depth``.

``plot(path)`` draws the step x choice heat map and the depth histogram.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from radial_jax.reporting.files import figure, save_figure


def route_rates(router, num_layers: int) -> dict:
    """In-graph shares for training logs: visits dropped by the budget, tokens that exit, that reuse a layer."""
    wanted = jnp.sum((router.choice >= 0) & (router.choice < num_layers))
    visits = router.assign.sum(0)  # [b, t, L]
    n = jnp.maximum(router.choice.shape[1] * router.choice.shape[2], 1)
    return {"drop_rate": jnp.sum(router.dropped) / jnp.maximum(wanted, 1),
            "exit_share": jnp.sum(router.exited[:-1]) / n, "reuse_share": jnp.sum((visits >= 2).any(-1)) / n}


class RouteStats:
    """Counts of the routes of a Radial Network over any number of forwards."""

    def __init__(self, num_layers: int, num_steps: int):
        self.L, self.S = num_layers, num_steps
        self.tokens = 0
        self.step_counts = np.zeros((num_steps, num_layers + 3), np.int64)  # layers, skip, exit, inactive
        self.wanted = np.zeros((num_steps, num_layers), np.int64)
        self.dropped = np.zeros(num_steps, np.int64)
        self.depth_hist = np.zeros(num_steps + 1, np.int64)
        self.reuse_tokens = 0
        self.reuse_visits = 0
        self.exited_tokens = 0

    def add(self, router, valid_bt) -> "RouteStats":
        """Count one forward's ``RouterOutput`` (leaves ``[S, b, t, ...]``) over its ``valid`` tokens."""
        valid = np.asarray(valid_bt, bool)
        choice = np.asarray(router.choice)[:, valid]  # [S, n]
        assign = np.asarray(router.assign)[:, valid]  # [S, n, L]
        exited = np.asarray(router.exited)[:, valid]
        dropped = np.asarray(router.dropped)[:, valid]
        L = self.L
        n = choice.shape[1]
        self.tokens += n
        processed = assign.any(-1)
        self.step_counts[:, :L] += assign.sum(1)
        self.step_counts[:, L] += ((choice == L) | ((choice >= 0) & (choice < L) & ~processed)).sum(1)
        self.step_counts[:, L + 1] += exited.sum(1)
        self.step_counts[:, L + 2] += (choice < 0).sum(1)
        wanted = (choice[..., None] == np.arange(L)).sum(1)
        self.wanted += wanted
        self.dropped += dropped.sum(1)
        visits = assign.sum(0)  # [n, L]
        depth = visits.sum(-1)
        self.depth_hist += np.bincount(np.minimum(depth, self.S), minlength=self.S + 1)
        self.reuse_tokens += int((visits >= 2).any(-1).sum())
        self.reuse_visits += int(np.maximum(visits - 1, 0).sum())
        # an exit at the last step changes nothing (no step follows): it is a skip, not an early exit
        self.exited_tokens += int(exited[:-1].any(0).sum())
        return self

    def summary(self) -> dict:
        n = max(self.tokens, 1)
        depth = np.arange(self.S + 1)
        return {
            "tokens": self.tokens, "num_layers": self.L, "num_steps": self.S,
            "choices": [f"layer {l}" for l in range(self.L)] + ["stay", "exit", "inactive"],
            "step_share": (self.step_counts / n).tolist(),
            "wanted_share": (self.wanted / n).tolist(),
            "dropped_share": (self.dropped / n).tolist(), "drop_rate": float(self.dropped.sum() / max(
                self.wanted.sum(), 1)),
            "reuse_token_share": self.reuse_tokens / n, "reuse_visits_per_token": self.reuse_visits / n,
            "exit_share": self.exited_tokens / n, "exits_by_step": self.step_counts[:, self.L + 1].tolist(),
            "depth_histogram": self.depth_hist.tolist(), "mean_depth": float((depth * self.depth_hist).sum() / n),
        }

    def plot(self, path, title: str = "routes") -> None:
        """Step x choice heat map of the shares (layers, skip, exit, inactive) and the depth histogram."""
        s = self.summary()
        plt, fig, (hm, hx) = figure(2, width=5.5)
        share = np.asarray(s["step_share"])
        im = hm.imshow(share, aspect="auto", cmap="viridis", vmin=0, vmax=max(share.max(), 1e-9))
        hm.set_xticks(range(self.L + 3))
        hm.set_xticklabels([str(l) for l in range(self.L)] + ["stay", "exit", "gone"], fontsize=7)
        hm.set_yticks(range(self.S))
        hm.set(xlabel="layer (or choice)", ylabel="step", title=f"{title}: share of tokens per step")
        fig.colorbar(im, ax=hm, fraction=0.046)
        hx.bar(np.arange(self.S + 1), s["depth_histogram"], color="tab:blue")
        hx.set_xticks(range(self.S + 1))
        hx.set(xlabel="layer visits per token", ylabel="tokens",
               title=f"depth (mean {s['mean_depth']:.2f}; reuse {100 * s['reuse_token_share']:.0f} %, "
                     f"exit {100 * s['exit_share']:.0f} %)")
        save_figure(plt, fig, path)
