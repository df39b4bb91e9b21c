"""Pod scale on simulated devices: 8 CPU devices vs 1, and two jax.distributed processes (gloo) vs one.

Everything runs in subprocesses (``XLA_FLAGS`` / ``jax.distributed`` must be set before jax starts).
The references are independent runs on one device in one process, float32, no remat:

* sharded loading (``rj.load(mesh=...)``) == unsharded loading, for OPT (projections, untied head),
  Llama (grouped-query attention, sharded safetensors index), GPT-2 (fused ``c_attn`` parts) and ViT
  (convolutions); in two processes each process reads only its own byte ranges (counted), and all
  of them together read each needed byte;
* LM training and distillation (teacher frozen and sharded, pool sharded, router replicated) on 8
  devices and in 2 processes == 1 device / 1 process after 3 steps of SGD at a learning rate that
  moves the parameters by > 0.05 (so a psum-vs-pmean or token-normalisation error, a factor of 2 in
  the gradient, would show as > 1e-2), to 1e-5;
* the plan's bytes per device (``radial-jax plan``, abstract inputs) == the bytes the real sharded
  state and inputs occupy on a device of the simulated mesh.

The two-process test fails (it does not skip) when gloo or jax.distributed is missing.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import make_opt, make_vit, xla_flags

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
TOL = 1e-5
MIN_MOVE = 0.05  # the SGD steps move some parameter at least this much (checked), 5000 x TOL

COMMON = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np, optax
import radial_jax as rj
from radial_jax.data.packed import PackedDataset
from radial_jax.models.bundle import example_inputs
from radial_jax.radial.router import with_keep_offset
from radial_jax.scale.sharding import logical_specs, make_mesh, override_rules
from radial_jax.training.distill_loss import DistillConfig, make_student
from radial_jax.training.lm import lm_loss_fn
from radial_jax.training.pod_steps import distill_step
from radial_jax.training.state import TrainState
from radial_jax.training.steps import global_batch, make_sharded_train_step, make_train_step, to_host

STEPS, LR = 3, 0.5
cfg = rj.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                   max_position_embeddings=32)
model = rj.build(cfg, seed=1)
tx = optax.sgd(LR)  # no adaptive scaling: a wrong gradient scale changes the update by the same factor
tokens = np.random.default_rng(0).integers(3, 64, 4000).astype(np.int32)
DCFG = DistillConfig(train="all", hidden_weight=0.5)

def flat(tree):
    return [np.asarray(l) for l in jax.tree_util.tree_leaves(to_host(tree))]

def max_diff(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))

def lm_run(mesh, data):
    loss_fn = lm_loss_fn(model.module)
    state = TrainState.create(model.params, tx)
    if mesh is None:
        step = make_train_step(loss_fn, tx)
    else:
        step, state = make_sharded_train_step(loss_fn, tx, state, mesh, logical_specs(model.module, *example_inputs(cfg)))
    for p in range(STEPS):
        state, m = step(state, data.batch(p) if mesh is None else global_batch(data.batch(p), mesh))
    return flat(state.params), float(m["loss"]), state

def distill_run(mesh, data, teacher=None, rules=None):
    teacher = teacher or model
    student = make_student(teacher, DCFG, seed=0)
    # keep logits far from 0 (router decisions are discrete): gradients flow through the straight-through gate
    params = {**student.params, "router": with_keep_offset(student.params["router"], 4.0)}
    step, state = distill_step(student, teacher, DCFG, tx, params, mesh=mesh, rules=rules)
    for p in range(STEPS):
        state, m = step(state, data.batch(p) if mesh is None else global_batch(data.batch(p), mesh))
    return flat(state.params), float(m["loss"]), [np.asarray(l) for l in jax.tree_util.tree_leaves(params)]
"""

EIGHT = COMMON + r"""
from radial_jax.checkpoints.tensor_files import READ_STATS
assert jax.device_count() == 8
report = {"load": {}}
# sharded loading == unsharded loading, every family's conversions
for name, path in json.loads(sys.argv[1]).items():
    READ_STATS.update(bytes=0, reads=0)
    ref = rj.load(path)
    whole = READ_STATS["bytes"]
    ref_leaves = [np.asarray(l) for l in jax.tree_util.tree_leaves(ref.params)]
    needed = 4 * ref.num_params  # float32 checkpoints: each parameter's bytes (a fused tensor's parts once each)
    row = {}
    for mesh_name, sizes, rules in (("d2f2t2", (2, 2, 2), None), ("expert", (1, 4, 2), override_rules(layers="fsdp"))):
        READ_STATS.update(bytes=0, reads=0)
        got = rj.load(path, mesh=make_mesh(*sizes), rules=rules)
        leaves = jax.tree_util.tree_leaves(got.params)
        row[mesh_name] = dict(max_abs=max_diff([np.asarray(l) for l in leaves], ref_leaves),
                              split=sum(not l.sharding.is_fully_replicated for l in leaves), leaves=len(leaves),
                              bytes=READ_STATS["bytes"], whole=whole, needed=needed)
    report["load"][name] = row

data = PackedDataset(tokens, 16, 8, seed=0)
ref, ref_loss, ref_state = lm_run(None, data)
start = [np.asarray(l) for l in jax.tree_util.tree_leaves(model.params)]
report["lm_moved"] = max_diff(ref, start)
report["lm"] = {}
for name, shape in {"data8": (8, 1, 1), "d2f2t2": (2, 2, 2), "fsdp4t2": (1, 4, 2)}.items():
    got, loss, state = lm_run(make_mesh(*shape), data)
    report["lm"][name] = dict(max_abs=max_diff(got, ref), loss_diff=abs(loss - ref_loss),
                              sharded=sum(not l.sharding.is_fully_replicated for l in jax.tree_util.tree_leaves(state.params)),
                              opt_sharded=sum(not l.sharding.is_fully_replicated for l in jax.tree_util.tree_leaves(state.opt_state)))

dref, dref_loss, dstart = distill_run(None, data)
report["distill_moved"] = max_diff(dref, dstart)
report["distill"] = {}
for name, shape, rules in (("d2f2t2", (2, 2, 2), None), ("expert_fsdp8", (1, 8, 1), override_rules(layers="fsdp"))):
    got, loss, _ = distill_run(make_mesh(*shape), data, rules=rules)
    report["distill"][name] = dict(max_abs=max_diff(got, dref), loss_diff=abs(loss - dref_loss))

# the plan's bytes == what the real sharded state and inputs occupy on device 0
from radial_jax.training.plan import make_plan
from radial_jax.training.memory import MemoryConfig
from radial_jax.training.optim import make_optimizer, OptimConfig
from radial_jax.training.steps import init_sharded_state
from radial_jax.scale.sharding import param_shardings
from radial_jax.scale.sharding import batch_sharding
mesh = make_mesh(2, 2, 2)
plan = make_plan(cfg, (2, 2, 2), task="train", batch=8, seq_len=8, memory=MemoryConfig())
adamw = make_optimizer(OptimConfig())
p_sh = param_shardings(model.params, logical_specs(model.module, *example_inputs(cfg)), mesh)
state, _ = init_sharded_state(jax.device_put(model.params, p_sh), adamw, mesh, p_sh)
batch = global_batch(data.batch(0)[:, :8], mesh)  # the plan's [8, 8] int32 batch
assert batch.shape == (8, 8)
dev = jax.devices()[0]
def on_dev(tree):
    return sum(s.data.nbytes for l in jax.tree_util.tree_leaves(tree) for s in l.addressable_shards if s.device == dev)
report["plan"] = dict(plan={k: plan.bytes_per_device[k] for k in ("params", "optimizer", "batch", "argument")},
                      real=dict(params=on_dev(state.params), optimizer=on_dev(state.opt_state), batch=on_dev(batch),
                                argument=on_dev(state) + on_dev(batch)))
print("REPORT" + json.dumps(report))
"""


def _checkpoints(root: Path) -> dict:
    """Tiny random checkpoints of four families, written by transformers."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    from conftest import perturb_
    make_opt(root / "opt", seed=0, word_embed_proj_dim=16, tie_word_embeddings=False)
    make_vit(root / "vit", seed=1)
    torch.manual_seed(2)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    perturb_(llama, 2).save_pretrained(root / "llama", max_shard_size="20KB")  # sharded: an index + shards
    torch.manual_seed(3)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    perturb_(gpt2, 3).save_pretrained(root / "gpt2")
    return {name: str(root / name) for name in ("opt", "vit", "llama", "gpt2")}


@pytest.fixture(scope="module")
def eight_device_report(tmp_path_factory):
    paths = _checkpoints(tmp_path_factory.mktemp("pod_ckpts"))
    env = dict(ENV, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"))
    proc = subprocess.run([sys.executable, "-c", EIGHT, json.dumps(paths)], env=env, capture_output=True, text=True,
                          timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("REPORT"))[6:])


@pytest.mark.parametrize("family", ["opt", "vit", "llama", "gpt2"])
def test_sharded_load_equals_unsharded_load(eight_device_report, family):
    for mesh, r in eight_device_report["load"][family].items():
        assert r["max_abs"] == 0.0, (family, mesh, r)  # the same bytes, converted the same way
        assert r["split"] >= r["leaves"] // 3, (family, mesh, r)  # really sharded
        # in one process: each needed byte read once (the unsharded load reads a fused tensor once per part)
        assert r["bytes"] == r["needed"] <= r["whole"], (family, mesh, r)


def test_train_step_8_devices_equals_1(eight_device_report):
    r = eight_device_report
    assert r["lm_moved"] > MIN_MOVE, r["lm_moved"]
    for name, row in r["lm"].items():
        assert row["max_abs"] < TOL and row["loss_diff"] < TOL, (name, row)
    assert r["lm"]["d2f2t2"]["sharded"] > 0 and r["lm"]["fsdp4t2"]["sharded"] > 0
    # optimiser state sharded like its parameters (SGD has none; the plan test covers AdamW's moments)


def test_distillation_8_devices_equals_1(eight_device_report):
    r = eight_device_report
    assert r["distill_moved"] > MIN_MOVE, r["distill_moved"]
    for name, row in r["distill"].items():
        assert row["max_abs"] < TOL and row["loss_diff"] < TOL, (name, row)


def test_plan_bytes_equal_the_memory_of_the_real_sharded_state(eight_device_report):
    plan, real = eight_device_report["plan"]["plan"], eight_device_report["plan"]["real"]
    assert plan["params"] == real["params"] and plan["optimizer"] == real["optimizer"], (plan, real)
    assert plan["batch"] == real["batch"]
    assert plan["argument"] == real["argument"], (plan, real)  # XLA's figure for the compiled step's inputs
    assert 2 * plan["params"] <= plan["optimizer"] <= 2 * plan["params"] + 1024  # AdamW: 2 moments, sharded alike


TWO_PROC = r"""
import os, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
pid, port, mode, out, ckpt = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
if mode == "multi":
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                               local_device_ids=[0])
""" + COMMON + r"""
from radial_jax.checkpoints.tensor_files import READ_STATS
n = jax.process_count()
mesh = make_mesh(data=1, fsdp=-1, devices=jax.devices())  # fsdp over the processes: batch and parameters split
READ_STATS.update(bytes=0, reads=0)
loaded = rj.load(ckpt, mesh=mesh)
read = READ_STATS["bytes"]
loaded_leaves = flat(loaded.params)
data = PackedDataset(tokens, 16, 4, seed=0, process_index=jax.process_index(), process_count=n)
lm, lm_loss, _ = lm_run(mesh, data)
dist, dist_loss, start = distill_run(mesh, data)
result = dict(loss=lm_loss, distill_loss=dist_loss, devices=jax.device_count(), read=read,
              moved=max_diff(dist, start))
np.savez(out + f".{pid}.npz", **{f"lm{i}": l for i, l in enumerate(lm)}, **{f"d{i}": l for i, l in enumerate(dist)},
         **{f"w{i}": l for i, l in enumerate(loaded_leaves)}, **{k: np.asarray(v) for k, v in result.items()})
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    """2 jax.distributed processes (gloo) == 1 process: sharded loading (own byte ranges), LM and distillation."""
    ckpt = tmp_path / "opt"
    make_opt(ckpt, seed=5)
    data_bytes = _used_tensor_bytes(ckpt)
    single = subprocess.run([sys.executable, "-c", TWO_PROC, "0", "0", "single", str(tmp_path / "one"), str(ckpt)],
                            env=ENV, capture_output=True, text=True, timeout=900)
    assert single.returncode == 0, single.stderr[-4000:]
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-c", TWO_PROC, str(i), port, "multi", str(tmp_path / "two"), str(ckpt)],
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=900))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("two-process run timed out")
    # no skip: a jaxlib without gloo CPU collectives, or a broken jax.distributed, is a failure here
    assert not any(p.returncode for p in procs), "\n".join(err[-3000:] for _, err in outs)
    one = np.load(tmp_path / "one.0.npz")
    two = [np.load(tmp_path / f"two.{i}.npz") for i in range(2)]
    assert int(one["devices"]) == 1 and all(int(t["devices"]) == 2 for t in two)
    assert float(one["moved"]) > MIN_MOVE
    for prefix in ("lm", "d", "w"):
        keys = [k for k in one.files if k.startswith(prefix) and k[len(prefix):].isdigit()]
        assert keys
        for t in two:
            for k in keys:
                np.testing.assert_allclose(t[k], one[k], atol=TOL, rtol=0, err_msg=k)
    for t in two:
        np.testing.assert_allclose(float(t["loss"]), float(one["loss"]), atol=TOL)
        np.testing.assert_allclose(float(t["distill_loss"]), float(one["distill_loss"]), atol=TOL)
    # bytes read: one process reads every needed byte once; each of two reads about half (its fsdp shards;
    # the few tensors too small to split are read by both), and together they cover everything
    reads = [int(t["read"]) for t in two]
    assert int(one["read"]) == data_bytes
    assert all(r < 0.6 * data_bytes for r in reads), (reads, data_bytes)
    assert sum(reads) >= data_bytes, (reads, data_bytes)


def _used_tensor_bytes(directory: Path) -> int:
    """Bytes of the tensors of model.safetensors that the model uses (the tied lm_head copy is not read)."""
    import struct
    raw = (directory / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
               if k != "__metadata__" and not k.endswith("lm_head.weight"))
