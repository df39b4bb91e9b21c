"""Serving speed of routed networks against their teacher: prefill and decoding, measured side by side.

``serving_speed(teacher, {"ordered": s1, "radial": s2}, prompts)`` times, with the
sides interleaved (``radial_jax.timing``), on the same prompts:

* prefill: the parallel forward of ``[batch, length]`` windows, logits included;
* decoding at each batch size: ``generate(N) - generate(1)`` seconds for the
  ``N - 1`` later tokens of every row (the one generation path both share;
  end-of-sequence disabled so every row decodes them all).

Speed-ups are teacher time / student time per round (median and spread). What a
student executes per decoded token (depth, FLOPs) comes from its own
``GenerationOutput``. On a small model the fixed costs of routing (router,
dispatch, branch selection) weigh more than on a large one; the numbers say what
they say on the machine they were measured on.
"""
from __future__ import annotations

from typing import Dict, Sequence

import jax
import numpy as np

from radial_jax.timing import interleave, ratio


def _forward(bundle, ids):
    return lambda: bundle(ids)


def _generate(bundle, ids, n):
    return lambda: bundle.generate(ids, max_new_tokens=n, eos_token_id=())


def serving_speed(teacher, students: Dict[str, object], prompts: np.ndarray, *, batch_sizes: Sequence[int] = (1, 8),
                  new_tokens: int = 16, repeats: int = 5) -> dict:
    """Speed-ups of each student over ``teacher`` (prefill, and decoding at each batch size); see the module doc.

    ``prompts``: ``[n, t]`` token ids with ``n >= max(batch_sizes)``; prefill uses ``min(n, 8)`` of them.
    """
    prompts = np.asarray(prompts)
    if prompts.ndim != 2 or len(prompts) < max(batch_sizes):
        raise ValueError(f"prompts must be [n >= {max(batch_sizes)}, t] token ids, got shape {prompts.shape}")
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 (decoding is timed after the first token), got {new_tokens}")
    result = {"prefill_shape": [min(len(prompts), 8), prompts.shape[1]], "new_tokens": new_tokens,
              "repeats": repeats, "backend": jax.default_backend(), "students": {}}
    batch = prompts[:min(len(prompts), 8)]
    for name, student in students.items():
        row = {}
        rounds = interleave({"teacher": _forward(teacher, batch), "student": _forward(student, batch)}, repeats)
        row["prefill_speedup"] = ratio(rounds, "teacher", "student")
        for b in batch_sizes:
            ids = prompts[:b]
            sides = {"teacher_1": _generate(teacher, ids, 1), "teacher_n": _generate(teacher, ids, new_tokens),
                     "student_1": _generate(student, ids, 1), "student_n": _generate(student, ids, new_tokens)}
            r = interleave(sides, repeats)
            teacher_s = [n - one for n, one in zip(r["teacher_n"], r["teacher_1"])]
            student_s = [n - one for n, one in zip(r["student_n"], r["student_1"])]
            out = student.generate(ids, max_new_tokens=new_tokens, eos_token_id=(), return_output=True)
            row[f"decode_b{b}_speedup"] = ratio({"t": teacher_s, "s": student_s}, "t", "s")
            row[f"decode_b{b}_depth_fraction"] = float(out.depth[:, 1:].mean() / student.config.num_layers)
            row[f"decode_b{b}_flops_per_step"] = float(np.mean(out.step_flops[1:]))
        result["students"][name] = row
    return result
