"""Language-model training of a sequential model (the "teacher" of the offline pipeline).

``train_lm(OPTConfig(...), text_data("embedded"), steps=300)`` builds the model
with ``rj.build``, trains it with next-token cross-entropy and returns a
trained ``rj.Model`` plus the history of metrics.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Union

import jax
import numpy as np

from radial_jax.data.corpus import window_batches
from radial_jax.data.packed import TextData
from radial_jax.models.bundle import Model, build, example_inputs
from radial_jax.models.family import module_for
from radial_jax.models.perplexity import TokenWeighted, lm_cross_entropy
from radial_jax.scale.sharding import AXIS_RULES, logical_specs
from radial_jax.training.loop import TrainConfig, fit
from radial_jax.training.memory import MemoryConfig
from radial_jax.training.optim import make_optimizer
from radial_jax.training.state import TrainState
from radial_jax.training.steps import make_sharded_train_step, make_train_step, to_host


def lm_loss_fn(module):
    """``loss(params, ids_bt, key) -> (nll, {"tokens": n})`` for a causal LM module (OPTForCausalLM)."""

    def loss(params, ids_bt, key):
        del key
        out = module.apply({"params": params}, ids_bt)
        nll, n = lm_cross_entropy(out.logits, ids_bt)
        return nll, {"tokens": n}

    return loss


def make_lm_eval(module, windows: np.ndarray, batch_size: int = 16):
    """``params -> {"eval_loss", "eval_ppl"}`` over fixed eval windows (token-weighted mean NLL)."""
    @jax.jit
    def nll_sum(params, ids_bt):
        out = module.apply({"params": params}, ids_bt)
        nll, n = lm_cross_entropy(out.logits, ids_bt)
        return nll * n, n

    window_batches(windows, batch_size, whole_only=True)  # too few windows: refused now, not at the first eval

    def evaluate(params):
        acc = TokenWeighted()
        for ids in window_batches(windows, batch_size, whole_only=True):  # one shape: one compile
            s, n = nll_sum(params, ids)
            acc.add(n, sums={"nll": s})
        return {"eval_loss": acc.mean("nll"), "eval_ppl": acc.perplexity("nll")}

    return evaluate


def train_lm(config, data: TextData, steps: Optional[int] = None, *, train: Optional[TrainConfig] = None,
             run_dir: Optional[Union[str, Path]] = None, model: Optional[Model] = None, mesh=None,
             progress: bool = True, callbacks=(), async_checkpoints: bool = True, memory=None, rules=None):
    """Train a sequential causal LM from scratch (or continue ``model``) on ``data``.

    Args:
      config: the model config (e.g. ``OPTConfig``); its ``vocab_size`` must cover the tokenizer's.
      data: ``TextData`` (``pipeline.text_data("embedded")``).
      steps: number of updates (overrides ``train.steps``).
      train: ``TrainConfig`` (batch, window, optimiser, checkpoints).
      run_dir: checkpoints + metrics; an existing run there is resumed exactly.
      mesh: optional device mesh: parameters sharded by the axis rules (``rules``, default ``AXIS_RULES``),
        optimiser moments like their parameters, batch over data x fsdp.
      memory: ``MemoryConfig`` (remat, bf16 compute on fp32 masters, gradient accumulation, donation).

    Returns:
      ``(model, history)``: the trained ``rj.Model`` and the list of logged metrics.
    """
    train = train or TrainConfig()
    if steps is not None:
        train = dataclasses.replace(train, steps=int(steps))
    train = train.with_schedule()
    if config.vocab_size < data.vocab_size:
        raise ValueError(f"model vocab_size {config.vocab_size} < tokenizer vocab {data.vocab_size}")
    if train.seq_len > config.max_length:
        raise ValueError(f"seq_len {train.seq_len} exceeds the model's {config.max_length} positions")
    model = model or build(config, seed=train.seed)
    tx = make_optimizer(train.optim)
    state = TrainState.create(model.params, tx, seed=train.seed)
    memory = memory or MemoryConfig()
    if train.debug:  # debug checks compare the old state with the new one: nothing may be donated
        memory = dataclasses.replace(memory, donate=False)
    loss_fn = lm_loss_fn(module_for(config, memory.dtype))  # compute dtype; the state keeps fp32 masters
    if mesh is None:
        step_fn = make_train_step(loss_fn, tx, memory=memory)
        pi, pc = 0, 1
    else:
        specs = logical_specs(model.module, *example_inputs(config), rules=AXIS_RULES if rules is None else rules)
        step_fn, state = make_sharded_train_step(loss_fn, tx, state, mesh, specs, memory=memory)
        pi, pc = jax.process_index(), jax.process_count()
    dataset = data.dataset(train.seq_len, train.batch_size, seed=train.seed, process_index=pi, process_count=pc)
    eval_windows = data.dataset(train.seq_len, 1, split="eval").all_windows(train.eval_batches * 16)
    eval_fn = make_lm_eval(model.module, eval_windows) if len(eval_windows) >= 16 else None
    run_config = {"train": train.to_dict(), "model": dataclasses.asdict(config), "data": data.source}
    state, history = fit(state, step_fn, dataset, train, run_dir=run_dir, run_config=run_config, eval_fn=eval_fn,
                         mesh=mesh, progress=progress, callbacks=callbacks, desc="train-lm",
                         async_checkpoints=async_checkpoints)
    trained = Model(config, to_host(state.params), dtype=model.dtype, name=f"{config.model_type}-trained",
                    tokenizer_path=data.tokenizer_source)
    return trained, history
