"""Serving speed of routed networks against their teacher: prefill and decoding, measured side by side.

``serving_speed(teacher, {"ordered": s1, "radial": s2}, windows)`` serves every model as
``generate`` does (the per-layer layout, ``Model.with_layout``) and times, with the sides
interleaved (``radial_jax.reporting.timing``), on the same text:

* prefill: ``generate``'s prefill of ``[batch, prompt_len]`` prompts (the forward, the
  cache written, the last token's logits), at the largest batch size;
* decoding at each batch size: ``new_tokens`` decode steps after that prefill (its first
  rows for a smaller batch: the causal budget counts per row, so a row's state does not
  depend on the others), teacher-forced with the windows' next tokens (real text, so the
  routes are those of real text), through the bundle's own ``decoding()`` functions, the
  ones ``generate`` runs at every step, in one compiled loop.

One prefill program per model, then, and one decode loop per model and batch size: what
compiles is what is timed. ``compile_s`` reports the seconds each took to compile (or to read
from JAX's compilation cache): the price of a served network's static sizes. Speed-ups are teacher time / student time per round (median and
spread). What a student executes per decoded token (depth, FLOPs) comes from the same timed
steps. On a small model the fixed costs of routing (router, dispatch, branch selection)
weigh more than on a large one; the numbers say what they say on the machine they were
measured on.
"""
from __future__ import annotations

import time
from typing import Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from radial_jax.reporting.timing import interleave, ratio
from radial_jax.serving.decoding import decode_loop, greedy, prefill


def prefill_program(bundle, batch: int, max_len: int, *, with_params: bool = False):
    """``jit``: ``(params, ids [batch, t]) -> (logits [batch, vocab], cache)``, the prefill ``generate`` runs on
    full prompts into a cache of ``max_len`` slots; ``with_params``: the params in the decoding layout too."""
    dec = bundle.decoding()

    @jax.jit
    def run(params, ids_bt):
        params = dec.prepare(params)
        logits, cache, _ = prefill(dec, params, ids_bt, jnp.ones(ids_bt.shape, bool), dec.init_cache(batch, max_len))
        return (logits, cache, params) if with_params else (logits, cache)
    return run


def timed_decode(bundle, prompts_bt, feed_bn, *, record: Sequence[str] = ("depth", "flops"),
                 compute_logits: bool = True, max_len: Optional[int] = None, start=None):
    """A timed callable: ``n`` teacher-forced decode steps of ``bundle`` (its ``decoding()`` through
    ``serving.decoding.decode_loop``, what ``generate`` runs) over the cache its prefill of ``prompts_bt``
    left, fed ``feed_bn [b, n]``. Calling it returns the loop's records ``[n, ...]``: ``"token"`` (each
    step's argmax, an output so that XLA cannot drop the work) and the step stats named in ``record``.
    ``compute_logits=False``: the layer stack alone (no head). ``max_len``: the cache's slots (default
    ``t + n``, what the steps need). ``start``: ``(params, cache)`` to decode from, the params in the decoding
    layout and the cache of these prompts (e.g. ``Decoding.first_rows`` of a larger prefill); by default the
    prefill runs once, here, untimed."""
    dec = bundle.decoding()
    (b, t), n = prompts_bt.shape, feed_bn.shape[1]

    @jax.jit
    def loop(params, cache, feed_bn):
        return decode_loop(dec, params, cache, None, jnp.full((b,), t, jnp.int32), jnp.zeros((b,), bool), steps=n,
                           choose=greedy, feed_bn=feed_bn, record=tuple(record), compute_logits=compute_logits)[1]

    if start is None:
        _, cache, params = prefill_program(bundle, b, max_len or t + n, with_params=True)(
            bundle.params, jnp.asarray(prompts_bt, jnp.int32))
    else:
        params, cache = start
    feed = jnp.asarray(feed_bn, jnp.int32)
    return lambda: loop(params, cache, feed)


def serving_speed(teacher, students: Dict[str, object], windows: np.ndarray, *, prompt_len: int,
                  batch_sizes: Sequence[int] = (1, 8), new_tokens: int = 16, repeats: int = 5) -> dict:
    """Speed-ups of each student over ``teacher`` (prefill, and decoding at each batch size); see the module doc.

    ``windows``: ``[n, t]`` token ids, ``n >= max(batch_sizes)``, ``t >= prompt_len + new_tokens``: the
    first ``prompt_len`` tokens of a window are its prompt, the next ``new_tokens`` are fed to the decode
    steps. Prefill runs on ``max(batch_sizes)`` prompts.
    """
    if "teacher" in students:
        raise ValueError(f"a student may not be named 'teacher' (the reference side); got {sorted(students)}")
    windows = np.asarray(windows)
    if windows.ndim != 2 or len(windows) < max(batch_sizes):
        raise ValueError(f"windows must be [n >= {max(batch_sizes)}, t] token ids, got shape {windows.shape}")
    if new_tokens < 1 or prompt_len < 1:
        raise ValueError(f"prompt_len and new_tokens must be >= 1, got {prompt_len} and {new_tokens}")
    if prompt_len + new_tokens > windows.shape[1]:
        raise ValueError(f"prompt_len {prompt_len} + new_tokens {new_tokens} exceeds the windows' "
                         f"{windows.shape[1]} tokens")
    prompts, feed = windows[:, :prompt_len], windows[:, prompt_len:prompt_len + new_tokens]
    batch = max(batch_sizes)
    result = {"prefill_shape": [batch, prompt_len], "new_tokens": new_tokens, "repeats": repeats,
              "backend": jax.default_backend(), "prefill": "generate's (cache written, last token's logits)",
              "decoding": "teacher-forced decode steps", "layout": "per_layer", "students": {}}
    served = {"teacher": teacher.with_layout("per_layer"),
              **{name: s.with_layout("per_layer") for name, s in students.items()}}
    ids = jnp.asarray(prompts[:batch], jnp.int32)
    prefills, decodes, compile_s = {}, {}, {}
    for name, model in served.items():  # one prefill program per model; its cache starts every decode
        t0 = time.perf_counter()
        run = prefill_program(model, batch, prompt_len + new_tokens).lower(model.params, ids).compile()
        compile_s[name] = {"prefill": time.perf_counter() - t0}
        _, cache = run(model.params, ids)
        prefills[name] = lambda run=run, params=model.params: run(params, ids)
        first_rows = model.decoding().first_rows
        decodes[name] = {b: timed_decode(model, prompts[:b], feed[:b], start=(model.params, first_rows(cache, b)))
                         for b in batch_sizes}
        for b, fn in decodes[name].items():  # the first call compiles (or reads the compilation cache)
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            compile_s[name][f"decode_b{b}_first_call"] = time.perf_counter() - t0
    result["compile_s"] = compile_s
    for name in students:
        row = {}
        sides = {"teacher": prefills["teacher"], "student": prefills[name]}
        row["prefill_speedup"] = ratio(interleave(sides, repeats), "teacher", "student")
        for b in batch_sizes:
            sides = {"teacher": decodes["teacher"][b], "student": decodes[name][b]}
            row[f"decode_b{b}_speedup"] = ratio(interleave(sides, repeats), "teacher", "student")
            rec = jax.device_get(sides["student"]())
            row[f"decode_b{b}_depth_fraction"] = float(np.mean(rec["depth"]) / served[name].config.num_layers)
            row[f"decode_b{b}_flops_per_step"] = float(np.mean(rec["flops"]))
        result["students"][name] = row
    return result
