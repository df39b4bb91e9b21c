"""The sharded train step: 8 simulated devices vs 1 device, and two jax.distributed processes vs one.

Both run in subprocesses (``XLA_FLAGS`` / ``jax.distributed`` must be set before
jax starts). The reference is the plain unsharded step on one device on the
same batches.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import xla_flags

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))

COMMON = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
import radial_jax as rj
from radial_jax.api import example_inputs
from radial_jax.sharding import logical_specs, make_mesh
from radial_jax.training.lm import lm_loss_fn
from radial_jax.training.optim import OptimConfig, make_optimizer
from radial_jax.training.pipeline import PackedDataset
from radial_jax.training.state import TrainState
from radial_jax.training.steps import global_batch, make_sharded_train_step, make_train_step, to_host

cfg = rj.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                   max_position_embeddings=32)
model = rj.build(cfg, seed=1)
tx = make_optimizer(OptimConfig(learning_rate=1e-3, warmup_steps=1, decay_steps=10))
loss_fn = lm_loss_fn(model.module)
tokens = np.random.default_rng(0).integers(3, 64, 4000).astype(np.int32)
STEPS = 3
"""

EIGHT = COMMON + r"""
assert jax.device_count() == 8
data = PackedDataset(tokens, 16, 8, seed=0)
ref_state = TrainState.create(jax.device_put(model.params, jax.devices()[0]), tx)
ref_step = make_train_step(loss_fn, tx)
for p in range(STEPS):
    ref_state, ref_m = ref_step(ref_state, data.batch(p))
report = {}
for name, shape in {"data8": (8, 1, 1), "d2f2t2": (2, 2, 2), "fsdp4t2": (1, 4, 2)}.items():
    mesh = make_mesh(*shape)
    specs = logical_specs(model.module, *example_inputs(cfg))
    step, state = make_sharded_train_step(loss_fn, tx, TrainState.create(model.params, tx), mesh, specs)
    for p in range(STEPS):
        state, m = step(state, global_batch(data.batch(p), mesh))
    leaves = jax.tree_util.tree_leaves(state.params)
    diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
               for a, b in zip(leaves, jax.tree_util.tree_leaves(ref_state.params)))
    report[name] = dict(max_abs=diff, loss_diff=abs(float(m["loss"]) - float(ref_m["loss"])),
                        sharded=sum(not l.sharding.is_fully_replicated for l in leaves), step=int(state.step))
print("REPORT" + json.dumps(report))
"""

TWO_PROC = r"""
import os, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
pid, port, mode, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
if mode == "multi":
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                               local_device_ids=[0])
""" + COMMON + r"""
n = jax.process_count()
mesh = make_mesh(data=-1, devices=jax.devices())
data = PackedDataset(tokens, 16, 4, seed=0, process_index=jax.process_index(), process_count=n)
specs = logical_specs(model.module, *example_inputs(cfg))
step, state = make_sharded_train_step(loss_fn, tx, TrainState.create(model.params, tx), mesh, specs)
for p in range(STEPS):
    state, m = step(state, global_batch(data.batch(p), mesh))
params = to_host(state.params)
if jax.process_index() == 0:
    np.savez(out, loss=float(m["loss"]), devices=jax.device_count(),
             **{str(i): np.asarray(l) for i, l in enumerate(jax.tree_util.tree_leaves(params))})
"""


def test_train_step_8_devices_equals_1():
    env = dict(ENV, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"))
    proc = subprocess.run([sys.executable, "-c", EIGHT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("REPORT"))[6:])
    for name, r in report.items():
        assert r["step"] == 3
        assert r["max_abs"] < 1e-5, (name, r)
        assert r["loss_diff"] < 1e-5, (name, r)
    assert report["d2f2t2"]["sharded"] > 0 and report["fsdp4t2"]["sharded"] > 0  # really sharded


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    single = subprocess.run([sys.executable, "-c", TWO_PROC, "0", "0", "single", str(tmp_path / "one.npz")],
                            env=ENV, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-4000:]
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-c", TWO_PROC, str(i), port, "multi", str(tmp_path / "two.npz")],
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=600))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("two-process run timed out")
    errors = "\n".join(err[-2000:] for _, err in outs)
    if any(p.returncode for p in procs):
        if "gloo" in errors.lower() and ("not" in errors.lower() and "support" in errors.lower()):
            pytest.skip(f"this jaxlib has no gloo CPU collectives: {errors[-500:]}")
        pytest.fail(errors)
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert int(one["devices"]) == 1 and int(two["devices"]) == 2
    keys = [k for k in one.files if k not in ("loss", "devices")]
    assert keys
    for k in keys:
        np.testing.assert_allclose(two[k], one[k], atol=1e-5, rtol=0)
    np.testing.assert_allclose(float(two["loss"]), float(one["loss"]), atol=1e-5)
