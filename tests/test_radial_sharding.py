"""8 simulated CPU devices with the layer pool sharded (``layers -> fsdp``) give what 1 device gives.

Runs in a subprocess because the device count must be set before jax is imported.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import xla_flags

SCRIPT = textwrap.dedent("""
    import numpy as np, jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec
    import radial_jax as rj
    from radial_jax.radial import RadialModel
    from radial_jax.scale.sharding import logical_specs, make_mesh, override_rules, shard_params
    assert jax.device_count() == 8, jax.devices()
    cfg = rj.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=8, ffn_dim=64, num_attention_heads=4,
                       max_position_embeddings=32)
    model = rj.build(cfg, seed=0)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 64, (8, 8)))
    mesh = make_mesh(data=1, fsdp=8)
    specs = logical_specs(model.module, ids, rules=override_rules(layers="fsdp"))
    assert specs["layers"]["fc1"]["kernel"][0] == "fsdp"
    for kw in (dict(mode="ordered", capacity_factor=0.5),
               dict(mode="radial", max_steps=6, capacity_factor=1.0, router_init_scale=1.5)):
        rm = RadialModel.from_sequential(model, prefill_buckets=2, **kw)
        f = jax.jit(lambda p, x: rm.module.apply({"params": p}, x))
        one = f(jax.device_put(rm.params, jax.devices()[0]), ids)
        sharded = dict(shard_params({k: v for k, v in rm.params.items() if k != "router"}, specs, mesh))
        sharded["router"] = jax.device_put(rm.params["router"], NamedSharding(mesh, PartitionSpec()))
        assert "fsdp" in str(sharded["layers"]["fc1"]["kernel"].sharding.spec)
        many = f(sharded, jax.device_put(ids, NamedSharding(mesh, PartitionSpec("fsdp"))))
        np.testing.assert_allclose(np.asarray(many.logits), np.asarray(one.logits), atol=1e-5, rtol=0)
        np.testing.assert_array_equal(np.asarray(many.router.choice), np.asarray(one.router.choice))
        np.testing.assert_array_equal(np.asarray(many.metrics.depth), np.asarray(one.metrics.depth))
    print("OK")
""")


def test_eight_devices_with_sharded_pool_equal_one():
    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"), JAX_PLATFORMS="cpu")
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
