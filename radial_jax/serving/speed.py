"""Serving speed of routed networks against their teacher: prefill and decoding, measured side by side.

``serving_speed(teacher, {"ordered": s1, "radial": s2}, windows)`` times, with the
sides interleaved (``radial_jax.reporting.timing``), on the same text:

* prefill: the parallel forward of ``[batch, prompt_len]`` prompts, logits included;
* decoding at each batch size: ``new_tokens`` decode steps after a prefilled prompt,
  teacher-forced with the windows' next tokens (real text, so the routes are those of
  real text), through the bundle's own ``decoding()`` functions, the ones ``generate``
  runs at every step, in one compiled loop (the prefill is not timed).

Speed-ups are teacher time / student time per round (median and spread). What a
student executes per decoded token (depth, FLOPs) comes from the same timed steps.
On a small model the fixed costs of routing (router, dispatch, branch selection)
weigh more than on a large one; the numbers say what they say on the machine they
were measured on.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from radial_jax.reporting.timing import interleave, ratio
from radial_jax.serving.decoding import decode_loop, greedy, prefill


def _forward(bundle, ids):
    return lambda: bundle(ids)


def timed_decode(bundle, prompts_bt, feed_bn, *, record: Sequence[str] = ("depth", "flops"),
                compute_logits: bool = True, max_len: Optional[int] = None):
    """A timed callable: ``n`` teacher-forced decode steps of ``bundle`` (its ``decoding()`` through
    ``serving.decoding.decode_loop``, what ``generate`` runs) over the cache its prefill of ``prompts_bt``
    left (the prefill runs once, here, untimed), fed ``feed_bn [b, n]``. Calling it returns the loop's
    records ``[n, ...]``: ``"token"`` (each step's argmax, an output so that XLA cannot drop the work) and
    the step stats named in ``record``. ``compute_logits=False``: the layer stack alone (no head).
    ``max_len``: the cache's slots (default ``t + n``, what the steps need)."""
    dec = bundle.decoding()
    (b, t), n = prompts_bt.shape, feed_bn.shape[1]

    @jax.jit
    def prefilled(params, ids_bt):
        params = dec.prepare(params)
        _, cache, _ = prefill(dec, params, ids_bt, jnp.ones(ids_bt.shape, bool), dec.init_cache(b, max_len or t + n))
        return params, cache

    @jax.jit
    def loop(params, cache, feed_bn):
        return decode_loop(dec, params, cache, None, jnp.full((b,), t, jnp.int32), jnp.zeros((b,), bool), steps=n,
                           choose=greedy, feed_bn=feed_bn, record=tuple(record), compute_logits=compute_logits)[1]

    params, cache = prefilled(bundle.params, jnp.asarray(prompts_bt, jnp.int32))
    feed = jnp.asarray(feed_bn, jnp.int32)
    return lambda: loop(params, cache, feed)


def serving_speed(teacher, students: Dict[str, object], windows: np.ndarray, *, prompt_len: int,
                  batch_sizes: Sequence[int] = (1, 8), new_tokens: int = 16, repeats: int = 5) -> dict:
    """Speed-ups of each student over ``teacher`` (prefill, and decoding at each batch size); see the module doc.

    ``windows``: ``[n, t]`` token ids, ``n >= max(batch_sizes)``, ``t >= prompt_len + new_tokens``: the
    first ``prompt_len`` tokens of a window are its prompt, the next ``new_tokens`` are fed to the decode
    steps. Prefill runs on ``min(n, 8)`` prompts.
    """
    windows = np.asarray(windows)
    if windows.ndim != 2 or len(windows) < max(batch_sizes):
        raise ValueError(f"windows must be [n >= {max(batch_sizes)}, t] token ids, got shape {windows.shape}")
    if new_tokens < 1 or prompt_len < 1:
        raise ValueError(f"prompt_len and new_tokens must be >= 1, got {prompt_len} and {new_tokens}")
    if prompt_len + new_tokens > windows.shape[1]:
        raise ValueError(f"prompt_len {prompt_len} + new_tokens {new_tokens} exceeds the windows' "
                         f"{windows.shape[1]} tokens")
    prompts, feed = windows[:, :prompt_len], windows[:, prompt_len:prompt_len + new_tokens]
    result = {"prefill_shape": [min(len(windows), 8), prompt_len], "new_tokens": new_tokens,
              "repeats": repeats, "backend": jax.default_backend(), "decoding": "teacher-forced decode steps",
              "students": {}}
    batch = prompts[:min(len(prompts), 8)]
    teacher_decode = {b: timed_decode(teacher, prompts[:b], feed[:b]) for b in batch_sizes}  # compiled once
    for name, student in students.items():
        row = {}
        rounds = interleave({"teacher": _forward(teacher, batch), "student": _forward(student, batch)}, repeats)
        row["prefill_speedup"] = ratio(rounds, "teacher", "student")
        for b in batch_sizes:
            sides = {"teacher": teacher_decode[b], "student": timed_decode(student, prompts[:b], feed[:b])}
            row[f"decode_b{b}_speedup"] = ratio(interleave(sides, repeats), "teacher", "student")
            rec = jax.device_get(sides["student"]())
            depth, flops = rec["depth"], rec["flops"]
            row[f"decode_b{b}_depth_fraction"] = float(np.mean(depth) / student.config.num_layers)
            row[f"decode_b{b}_flops_per_step"] = float(np.mean(flops))
        result["students"][name] = row
    return result
