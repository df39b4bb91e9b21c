"""Forward (and greedy generation) on 8 simulated CPU devices with parameters sharded by the axis rules.

The 8-device part runs in a subprocess with ``XLA_FLAGS`` set before jax is
imported, so this pytest process keeps its single device. The reference is the
same checkpoint run unsharded on one device; transformers parity of that
result is covered by ``test_models_parity.py``.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import xla_flags

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec
import radial_jax as rj
from radial_jax.models.bundle import example_inputs
from radial_jax.scale.sharding import batch_sharding, logical_specs, make_mesh, shard_params

opt_dir, vit_dir = sys.argv[1], sys.argv[2]
assert jax.device_count() == 8, jax.devices()
mesh = make_mesh(data=2, fsdp=2, tensor=2)
report = {}

def sharded_copy(model):
    specs = logical_specs(model.module, *example_inputs(model.config))
    params = shard_params(model.params, specs, mesh)
    leaves = jax.tree_util.tree_leaves(params)
    split = sum(not p.sharding.is_fully_replicated for p in leaves)
    return rj.Model(model.config, params, dtype=model.dtype, name=model.name + "-sharded"), split, len(leaves)

def one_device(tree):
    return jax.device_put(tree, jax.devices()[0])

# OPT: logits of a left-padded batch of 4, and greedy generation
opt = rj.load(opt_dir)
opt.params = one_device(opt.params)
rng = np.random.default_rng(0)
ids = rng.integers(3, opt.config.vocab_size, (4, 9)).astype(np.int32)
mask = np.ones((4, 9), np.int32); mask[1, :4] = 0; mask[3, :7] = 0
ref_logits = np.asarray(opt(ids, mask))
ref_tokens = opt.generate(ids, mask, max_new_tokens=5, eos_token_id=())
opt_s, split, total = sharded_copy(opt)
ids_s = jax.device_put(ids, batch_sharding(mesh, 2)); mask_s = jax.device_put(mask, batch_sharding(mesh, 2))
logits = opt_s(ids_s, mask_s)
report["opt"] = dict(max_abs=float(np.abs(np.asarray(logits) - ref_logits).max()), sharded_leaves=split,
                     leaves=total, logits_devices=len(logits.sharding.device_set),
                     tokens_equal=bool((opt_s.generate(ids, mask, max_new_tokens=5, eos_token_id=()) == ref_tokens).all()))

# ViT classifier: logits of a batch of 4 images
vit = rj.load(vit_dir)
vit.params = one_device(vit.params)
pixels = rng.normal(size=(4, 3, vit.config.image_size, vit.config.image_size)).astype(np.float32)
ref_logits = np.asarray(vit(pixels))
vit_s, split, total = sharded_copy(vit)
logits = vit_s(jax.device_put(pixels, batch_sharding(mesh, 4)))
report["vit"] = dict(max_abs=float(np.abs(np.asarray(logits) - ref_logits).max()), sharded_leaves=split,
                     leaves=total, logits_devices=len(logits.sharding.device_set))
print("REPORT" + json.dumps(report))
"""


@pytest.fixture(scope="module")
def eight_device_report(tiny_opt_dir, tiny_vit_cls_dir):
    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"), JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tiny_opt_dir), str(tiny_vit_cls_dir)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("REPORT"))
    return json.loads(line[len("REPORT"):])


@pytest.mark.parametrize("family", ["opt", "vit"])
def test_sharded_forward_equals_one_device(eight_device_report, family):
    r = eight_device_report[family]
    # the parameters really were split over the mesh, and the work ran on all 8 devices
    assert r["sharded_leaves"] >= r["leaves"] // 2, r
    assert r["logits_devices"] == 8, r
    assert r["max_abs"] <= 1e-5, r


def test_sharded_greedy_generation_equals_one_device(eight_device_report):
    assert eight_device_report["opt"]["tokens_equal"]
