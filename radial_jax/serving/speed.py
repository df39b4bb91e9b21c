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
compiles is what is timed, and every program is compiled before the timing starts, two at
a time on 2 cores (``reporting.timing.compile_in_parallel``). ``compile_s`` reports the
seconds each took to compile (or to read from JAX's compilation cache): the price of a
served network's static sizes. Speed-ups are teacher time / student time per round (median and
spread). What a student executes per decoded token (depth, FLOPs) comes from the same timed
steps. On a small model the fixed costs of routing (router, dispatch, branch selection)
weigh more than on a large one; the numbers say what they say on the machine they were
measured on.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from radial_jax.reporting.timing import compile_in_parallel, interleave, ratio
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


def decode_program(bundle, batch: int, prompt_len: int, steps: int, *, record: Sequence[str] = ("depth", "flops"),
                   compute_logits: bool = True):
    """``jit``: ``(params, cache, feed [batch, steps]) -> records``: ``steps`` teacher-forced decode steps of
    ``bundle`` (its ``decoding()`` through ``serving.decoding.decode_loop``, what ``generate`` runs) after
    prompts of ``prompt_len`` tokens, over their prefill's cache; the params in the decoding layout. The
    records ``[steps, ...]``: ``"token"`` (each step's argmax, an output so that XLA cannot drop the work) and
    the step stats named in ``record``. ``compute_logits=False``: the layer stack alone (no head)."""
    dec = bundle.decoding()

    @jax.jit
    def loop(params, cache, feed_bn):
        return decode_loop(dec, params, cache, None, jnp.full((batch,), prompt_len, jnp.int32),
                           jnp.zeros((batch,), bool), steps=steps, choose=greedy, feed_bn=feed_bn,
                           record=tuple(record), compute_logits=compute_logits)[1]
    return loop


def timed_decode(bundle, prompts_bt, feed_bn, *, record: Sequence[str] = ("depth", "flops"),
                 compute_logits: bool = True, max_len: Optional[int] = None):
    """A timed callable: ``decode_program`` of ``bundle`` fed ``feed_bn [b, n]`` after its prefill of
    ``prompts_bt`` (run once, here, untimed); calling it returns the records. ``max_len``: the cache's slots
    (default ``t + n``, what the steps need)."""
    (b, t), n = prompts_bt.shape, feed_bn.shape[1]
    loop = decode_program(bundle, b, t, n, record=record, compute_logits=compute_logits)
    _, cache, params = prefill_program(bundle, b, max_len or t + n, with_params=True)(
        bundle.params, jnp.asarray(prompts_bt, jnp.int32))
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
    feeds = {b: jnp.asarray(feed[:b], jnp.int32) for b in batch_sizes}
    # every program lowered (the decode loops from the prefill's output shapes), then all compiled at once,
    # the largest batch's decode loops first: keys (model, "prefill" or "decode", batch)
    lowered = {}
    for name, model in served.items():
        prefill_key = (name, "prefill", batch)
        lowered[prefill_key] = prefill_program(model, batch, prompt_len + new_tokens).lower(model.params, ids)
        cache = lowered[prefill_key].out_info[1]
        for b in batch_sizes:
            rows = jax.eval_shape(lambda c, b=b: model.decoding().first_rows(c, b), cache)
            loop = decode_program(model, b, prompt_len, new_tokens)
            lowered[(name, "decode", b)] = loop.lower(model.params, rows, feeds[b])
    order = sorted(lowered, key=lambda key: (key[1] == "prefill", -key[2]))
    compiled, seconds = compile_in_parallel({key: lowered[key] for key in order})
    prefills, decodes = {}, {name: {} for name in served}
    for name, model in served.items():  # one prefill per model; its cache starts every decode
        run = compiled[(name, "prefill", batch)]
        _, cache = run(model.params, ids)
        prefills[name] = lambda run=run, params=model.params: run(params, ids)
        for b in batch_sizes:
            rows = model.decoding().first_rows(cache, b)
            loop = compiled[(name, "decode", b)]
            decodes[name][b] = lambda loop=loop, params=model.params, rows=rows, b=b: loop(params, rows, feeds[b])
    result["compile_s"] = {name: {(what if what == "prefill" else f"decode_b{b}"): sec
                                  for (n, what, b), sec in seconds.items() if n == name} for name in served}
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
