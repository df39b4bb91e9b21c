"""Pod-scale pieces that run in this process (one device): --mesh parsing, sliced safetensors reads, remat,
gradient accumulation, bf16 mixed precision. The multi-device and multi-process parts are in
``test_training_distributed.py``.

References: numpy slicing of the whole tensor (sliced reads), the same step without remat / without
accumulation (equal to 1e-6), and the float32 step (mixed precision, within a stated tolerance).
"""
import json
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import radial_jax as rj
from radial_jax.models.family import module_for
from radial_jax.checkpoints.tensor_files import READ_STATS, safetensors_tensors
from radial_jax.scale.pod import parse_mesh
from radial_jax.training.lm import lm_loss_fn
from radial_jax.training.memory import MemoryConfig
from radial_jax.training.state import TrainState
from radial_jax.training.steps import make_train_step

CFG = rj.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, ffn_dim=64, num_attention_heads=4,
                   max_position_embeddings=32)


@pytest.mark.parametrize("text, sizes", [("4,8,1", (4, 8, 1)), ("-1, 2, 1", (-1, 2, 1)), ("1,1,8", (1, 1, 8))])
def test_mesh_flag_parses(text, sizes):
    assert parse_mesh(text) == sizes


@pytest.mark.parametrize("text, what", [("4,8", "has 2 value"), ("a,b,c", "not made of integers"),
                                        ("0,8,1", "not allowed"), ("-1,-1,2", "not allowed"),
                                        ("2,-3,1", "not allowed")])
def test_bad_mesh_flag_says_what_is_wrong_and_what_is_allowed(text, what):
    with pytest.raises(ValueError, match=what) as e:
        parse_mesh(text)
    assert "data, fsdp, tensor" in str(e.value) and "-1" in str(e.value)


def test_bad_mesh_flag_is_refused_by_the_cli_before_any_work(capsys):
    from radial_jax.cli import main
    with pytest.raises(SystemExit) as e:
        main(["distill", "--teacher", "/nonexistent", "--run-dir", "/tmp/x", "--mesh", "2,2"])
    assert e.value.code == 2
    assert "three comma-separated integers" in capsys.readouterr().err


def test_memory_config_validates():
    for bad in (dict(remat="sometimes"), dict(compute_dtype="float16"), dict(grad_accum=0)):
        with pytest.raises(ValueError):
            MemoryConfig(**bad)


# -- sliced reads of a safetensors tensor -------------------------------------------------------------------
def _write_safetensors(path, tensors: dict):
    codes = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.int32): "I32"}
    header, blobs, offset = {}, [], 0
    for name, a in tensors.items():
        raw = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": codes[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))
    return 8 + len(h)


@pytest.mark.parametrize("chunk_bytes", [None, 100])  # one read per slice; rows read in many chunks
def test_sliced_reads_equal_numpy_slicing_and_read_only_the_slice(tmp_path, monkeypatch, chunk_bytes):
    if chunk_bytes:
        monkeypatch.setattr("radial_jax.checkpoints.tensor_files.CHUNK_BYTES", chunk_bytes)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 10, 4)).astype(np.float32)
    b = rng.normal(size=(12, 8)).astype(ml_dtypes.bfloat16)
    _write_safetensors(tmp_path / "t.safetensors", {"a": a, "b": b})  # written by hand: an independent writer
    readers = safetensors_tensors(tmp_path / "t.safetensors")
    ta, tb = readers["a"], readers["b"]
    assert (ta.dtype, ta.shape, tb.dtype, tb.shape) == (np.float32, a.shape, ml_dtypes.bfloat16, b.shape)
    np.testing.assert_array_equal(ta(), a)
    for index in [(slice(1, 3), slice(2, 9), slice(0, 4)), (slice(0, 6), slice(0, 10), slice(1, 3)),
                  (slice(5, 6),), (slice(0, 6), slice(4, 5))]:
        before = READ_STATS["bytes"]
        np.testing.assert_array_equal(ta.read(index), a[index])
        assert READ_STATS["bytes"] - before == a[index].nbytes  # only the slice's bytes
    np.testing.assert_array_equal(tb.read((slice(3, 9), slice(2, 6))), b[3:9, 2:6])


# -- remat, accumulation, mixed precision -----------------------------------------------------------------
def _batches(n, rows=8, length=16):
    return [np.random.default_rng(i).integers(3, 64, (rows, length)).astype(np.int32) for i in range(n)]


def _loss_and_grads(policy, params, ids):
    """Loss and gradients of the LM loss, the remat policy set while tracing (as the train step does)."""
    from radial_jax.models.remat import remat
    module = module_for(CFG)
    with remat(policy):
        return jax.jit(jax.value_and_grad(lambda p: lm_loss_fn(module)(p, ids, None)[0]))(params)


def _grad_program(name, params, ids):
    """The lowered text of the LM loss's gradient under remat policy ``name``."""
    from radial_jax.models.remat import remat
    module = module_for(CFG)
    with remat(name):
        return jax.jit(jax.grad(lambda p: lm_loss_fn(module)(p, ids, None)[0])).lower(params).as_text()


@pytest.fixture(scope="module")
def remat_reference():
    """The model, the batch, and the reference without remat (its loss, gradients and gradient program),
    computed once for every policy."""
    model = rj.build(CFG, seed=0)
    ids = jnp.asarray(_batches(1)[0])
    ref_loss, ref_grads = _loss_and_grads("none", model.params, ids)
    return model, ids, ref_loss, ref_grads, _grad_program("none", model.params, ids)


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_gives_the_same_loss_and_gradients(policy, remat_reference):
    model, ids, ref_loss, ref_grads, ref_program = remat_reference
    loss, grads = _loss_and_grads(policy, model.params, ids)
    assert abs(float(loss) - float(ref_loss)) < 1e-6
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
    # the policy really changed the compiled program (recomputation in the backward pass)
    assert _grad_program(policy, model.params, ids) != ref_program


def _train(memory, steps, lr=0.05, repeat=False, tx=None):
    model = rj.build(CFG, seed=0)
    tx = tx or optax.sgd(lr)
    step = make_train_step(lm_loss_fn(module_for(CFG, memory.dtype)), tx, memory=memory)
    state = TrainState.create(model.params, tx)
    losses = []
    for ids in (_batches(1) * steps if repeat else _batches(steps)):
        state, m = step(state, ids)
        losses.append(float(m["loss"]))
    return state, np.array(losses), model.params


def test_gradient_accumulation_equals_the_whole_batch():
    ref, ref_losses, start = _train(MemoryConfig(), 3, lr=0.5)
    acc, losses, _ = _train(MemoryConfig(grad_accum=4), 3, lr=0.5)
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(jax.tree_util.tree_leaves(ref.params), jax.tree_util.tree_leaves(start)))
    assert moved > 1e-2  # SGD at this rate moves the parameters: a gradient-scale error could not hide
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=0)
    for a, b in zip(jax.tree_util.tree_leaves(acc.params), jax.tree_util.tree_leaves(ref.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


# bf16 keeps 8 significant bits: one rounding is a relative error of at most 2^-9 = 2e-3. Over 20 AdamW
# updates (lr 3e-3, the library's default) of a tiny model learning one batch, the loss of the bf16 run stays
# within 0.3 % of the fp32 run's (measured); we allow 2 % at every step (MIXED_RTOL), a margin for other
# machines, far below what a broken cast shows (a step whose updates were rounded onto bf16 weights, i.e.
# without fp32 masters, stalls: updates of 3e-3 vanish on weights of ~0.1 at bf16's 2^-9 spacing). The
# parameters went the same way: |p_bf16 - p_fp32| is under 30 % of how far the fp32 run moved them (14 %
# measured; Adam's normalisation turns tiny gradient differences into sign-sized update differences).
MIXED_RTOL = 2e-2


def test_bf16_mixed_precision_tracks_float32_over_20_steps():
    tx = optax.adamw(3e-3)
    ref, ref_losses, start = _train(MemoryConfig(), 20, repeat=True, tx=tx)  # one batch, learnt: the loss falls
    mixed, losses, _ = _train(MemoryConfig(compute_dtype="bfloat16"), 20, repeat=True, tx=tx)
    assert all(l.dtype == jnp.float32 for l in jax.tree_util.tree_leaves(mixed.params))  # fp32 masters
    assert all(l.dtype == jnp.float32 for l in jax.tree_util.tree_leaves(mixed.opt_state)
               if jnp.issubdtype(l.dtype, jnp.floating))  # fp32 moments
    assert np.all(np.abs(losses - ref_losses) <= MIXED_RTOL * ref_losses), (losses, ref_losses)
    assert ref_losses[-1] < ref_losses[0] - 0.5  # it trained: the comparison is not between two flat lines
    flat = lambda t: np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree_util.tree_leaves(t)])  # noqa: E731
    a, b, p0 = flat(ref.params), flat(mixed.params), flat(start)
    assert np.linalg.norm(b - a) < 0.3 * np.linalg.norm(a - p0)
    assert not np.allclose(losses, ref_losses, atol=1e-7, rtol=0)  # it really computed in bf16


def test_remat_gives_the_same_distillation_step():
    """The Radial Network's scan over steps (the student) under remat: the same loss and update."""
    from radial_jax.training.distill_loss import DistillConfig, make_student
    from radial_jax.training.pod_steps import distill_step
    teacher = rj.build(rj.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                    num_attention_heads=4, max_position_embeddings=32), seed=1)
    cfg = DistillConfig(train="all")
    student = make_student(teacher, cfg)
    ids = _batches(1, rows=4)[0]
    out = {}
    for policy in ("none", "full"):
        step, state = distill_step(student, teacher, cfg, optax.sgd(1.0), student.params,
                                   memory=MemoryConfig(remat=policy))
        new, m = step(state, ids)  # SGD at rate 1: the update is the gradient
        out[policy] = (float(m["loss"]), jax.tree_util.tree_leaves(new.params))
    assert abs(out["full"][0] - out["none"][0]) < 1e-6
    for a, b in zip(out["full"][1], out["none"][1]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)


def test_plan_command_on_simulated_devices(tmp_path):
    """``radial-jax plan`` in a fresh process: it sets up its own 8 simulated devices, reads a local config,
    prints the table, writes the JSON, and exits 3 when the plan does not fit the named accelerator."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    (tmp_path / "config.json").write_text(json.dumps(dict(
        model_type="opt", vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
        max_position_embeddings=64)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    from conftest import xla_flags
    env["XLA_FLAGS"] = xla_flags()  # the suite's compile flags; plan sets its own simulated device count
    cmd = [sys.executable, "-m", "radial_jax.cli", "plan", "--model", str(tmp_path), "--mesh", "2,2,2", "--task",
           "train", "--batch", "8", "--seq-len", "16", "--grad-accum", "1", "--json", str(tmp_path / "plan.json")]
    proc = subprocess.run(cmd + ["--accelerator", "tpu-v4"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "8 devices" in proc.stdout and "peak" in proc.stdout and "tpu-v4" in proc.stdout
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["devices"] == 8 and plan["fits"]["tpu-v4"]["fits"]
    b = plan["bytes_per_device"]
    assert b["peak"] == b["argument"] + b["output"] - b["alias"] + b["temp"] and b["params"] > 0
    bad = subprocess.run(cmd[:6] + ["--mesh=-1,2,2"] + cmd[8:], env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "no -1" in bad.stderr
