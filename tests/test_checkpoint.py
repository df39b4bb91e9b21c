"""Checkpoints: exact resume after kill -9, interrupted saves never restored, clear mismatch errors, NaN stop.

The reference of "exact resume" is an uninterrupted run of the same script; the
crash is a real SIGKILL of a subprocess in the middle of training.
"""
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from radial_jax.training.checkpoint import Checkpointer, CheckpointMismatchError, CheckpointUnreadableError
from radial_jax.training.loop import TrainConfig, fit
from radial_jax.training.optim import OptimConfig, make_optimizer
from radial_jax.training.state import TrainState
from radial_jax.training.steps import NonFiniteLossError, make_train_step

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))

RUN = r"""
import os, signal, sys
import numpy as np
import radial_jax as rj
from radial_jax.training.lm import train_lm
from radial_jax.training.loop import TrainConfig
from radial_jax.data.packed import text_data

run_dir, out, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
tokens = np.random.default_rng(0).integers(3, 40, 6000).astype(np.int32)
cfg = rj.OPTConfig(vocab_size=48, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2,
                   max_position_embeddings=32)
def crash(step, state, metrics):
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
model, _ = train_lm(cfg, text_data(tokens), 9, train=TrainConfig(batch_size=4, seq_len=16, checkpoint_every=2,
                    log_every=1), run_dir=run_dir, progress=False, callbacks=[crash])
np.savez(out, **{jax_path: v for jax_path, v in
                 ((str(i), np.asarray(l)) for i, l in enumerate(__import__("jax").tree_util.tree_leaves(model.params)))})
"""


def _run(*args):
    return subprocess.run([sys.executable, "-c", RUN, *map(str, args)], env=ENV, capture_output=True, text=True,
                          timeout=600)


def test_kill9_then_resume_is_bitwise_equal(tmp_path):
    ref = _run(tmp_path / "ref", tmp_path / "ref.npz", -1)
    assert ref.returncode == 0, ref.stderr[-3000:]
    crashed = _run(tmp_path / "run", tmp_path / "run.npz", 7)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    assert not (tmp_path / "run.npz").exists()
    saved = Checkpointer(tmp_path / "run" / "checkpoints").latest_step()
    assert saved in (4, 6), saved  # the run died between checkpoints; resuming must replay steps
    resumed = _run(tmp_path / "run", tmp_path / "run.npz", -1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "run.npz")
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k])
    # and the run really trained: parameters differ from the initialisation of the same seed
    import radial_jax as rj
    init = jax.tree_util.tree_leaves(rj.build(rj.OPTConfig(vocab_size=48, hidden_size=16, num_hidden_layers=2,
                                                           ffn_dim=32, num_attention_heads=2,
                                                           max_position_embeddings=32)).params)
    assert any(not np.array_equal(np.asarray(x), a[str(i)]) for i, x in enumerate(init))


INTERRUPTED = r"""
import os, signal, sys
from pathlib import Path
import jax.numpy as jnp
from orbax.checkpoint._src.path import atomicity
from radial_jax.training.checkpoint import Checkpointer

directory, marker = sys.argv[1], Path(sys.argv[2])
commit = atomicity.AtomicRenameTemporaryPath.finalize

async def finalize_then_die(self, *args, **kwargs):
    # the known point: step 2's temporary directory is fully written, the rename has not happened
    if Path(str(self._final_path)).name == "2":
        files = sorted(str(p.relative_to(str(self._tmp_path))) for p in Path(str(self._tmp_path)).rglob("*"))
        marker.write_text("\n".join([str(self._tmp_path)] + files))
        os.kill(os.getpid(), signal.SIGKILL)
    return await commit(self, *args, **kwargs)

atomicity.AtomicRenameTemporaryPath.finalize = finalize_then_die
ck = Checkpointer(directory, every=1, config={"a": 1})
ck.save(1, {"w": jnp.ones((256, 1024))}); ck.wait()
ck.save(2, {"w": jnp.full((256, 1024), 2.0)}); ck.wait()  # killed inside the save, before the rename
sys.exit(3)  # not reached
"""


def test_interrupted_save_is_never_restored(tmp_path):
    """Deterministic: the child is killed (SIGKILL) at a known point of step 2's asynchronous save, after
    its temporary directory is written and before the rename that commits it (orbax's
    ``AtomicRenameTemporaryPath.finalize``, patched in the child); step 1 stays the latest."""
    marker = tmp_path / "killed_at.txt"
    proc = subprocess.run([sys.executable, "-c", INTERRUPTED, str(tmp_path), str(marker)], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    tmp_dir, *written = marker.read_text().splitlines()
    assert Path(tmp_dir).is_dir() and written, "the temporary write happened before the kill"
    assert Path(tmp_dir).name.startswith("2.") and Path(tmp_dir).parent == tmp_path / "latest"
    leftovers = [p.name for p in (tmp_path / "latest").iterdir()]
    assert "1" in leftovers and "2" not in leftovers, leftovers  # step 2 never committed, only debris
    ck = Checkpointer(tmp_path, every=1, config={"a": 1})
    assert ck.latest_step() == 1
    state, meta = ck.restore({"w": jnp.zeros((256, 1024))})
    np.testing.assert_array_equal(np.asarray(state["w"]), 1.0)
    # saving step 2 again works over the debris
    ck.save(2, {"w": jnp.full((256, 1024), 3.0)}); ck.wait()
    assert ck.latest_step() == 2
    ck.close()


# -- in-process: a toy linear model, so these are fast ------------------------------------------------
class ToyData:
    """``batch(p)``: rows of a fixed float table; NaN at position ``nan_at``."""

    seq_len, local_batch_size = 3, 2

    def __init__(self, nan_at=-1):
        self.nan_at = nan_at

    def batch(self, p):
        x = np.random.default_rng(p).normal(size=(2, 3)).astype(np.float32)
        if p == self.nan_at:
            x[1, 2] = np.nan
        return x


def toy_loss(params, x, key):
    return jnp.mean((x @ params["w"] - 1.0) ** 2), {}


def toy_state(shape=(3, 2), cfg=None):
    tx = make_optimizer((cfg or TrainConfig()).optim)
    return TrainState.create({"w": jnp.full(shape, 0.1)}, tx), tx


def toy_fit(tmp_path, cfg, data=None, shape=(3, 2)):
    state, tx = toy_state(shape, cfg)
    return fit(state, make_train_step(toy_loss, tx), data or ToyData(), cfg, run_dir=tmp_path, progress=False,
               async_checkpoints=False)


def test_resume_with_other_config_names_fields(tmp_path):
    cfg = TrainConfig(steps=4, checkpoint_every=2, log_every=1)
    toy_fit(tmp_path, cfg)
    other = TrainConfig(steps=6, checkpoint_every=2, log_every=1, optim=OptimConfig(learning_rate=1e-2))
    with pytest.raises(CheckpointMismatchError, match=r"optim\.learning_rate.*steps|steps.*optim\.learning_rate"):
        toy_fit(tmp_path, other)
    # logging-only fields may change
    toy_fit(tmp_path, TrainConfig(steps=4, checkpoint_every=2, log_every=2))


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path):
    cfg = TrainConfig(steps=2, checkpoint_every=2)
    toy_fit(tmp_path, cfg)
    with pytest.raises(CheckpointMismatchError, match=r"params/w: stored shape \(3, 2\), expected \(3, 5\)"):
        toy_fit(tmp_path, cfg, shape=(3, 5))
    state, _ = toy_fit(tmp_path, cfg)  # nothing was lost
    assert int(state.step) == 2


def test_nan_loss_stops_with_step_and_batch_last_checkpoint_intact(tmp_path):
    cfg = TrainConfig(steps=8, checkpoint_every=2, log_every=1)
    with pytest.raises(NonFiniteLossError, match="step 4 .*data position 3") as info:
        toy_fit(tmp_path, cfg, ToyData(nan_at=3))
    assert np.isnan(info.value.batch).any() and info.value.batch.shape == (2, 3)
    ck = Checkpointer(tmp_path / "checkpoints", config=cfg.to_dict())
    assert ck.latest_step() == 2
    restored, _ = ck.restore(toy_state(cfg=cfg)[0])
    assert np.isfinite(np.asarray(restored.params["w"])).all() and int(restored.data_pos) == 2
    # an independent replay of two steps (plain optax) gives the checkpointed params
    import optax
    tx = make_optimizer(cfg.optim)
    p = {"w": jnp.full((3, 2), 0.1)}
    s = tx.init(p)
    for pos in range(2):
        g = jax.grad(lambda q: toy_loss(q, ToyData().batch(pos), None)[0])(p)
        u, s = tx.update(g, s, p)
        p = optax.apply_updates(p, u)
    np.testing.assert_allclose(np.asarray(restored.params["w"]), np.asarray(p["w"]), rtol=1e-6)


def test_best_by_eval_and_keep_n(tmp_path):
    ck = Checkpointer(tmp_path, every=1, keep=2, keep_best=1, best_metric="eval_loss", async_save=False)
    for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0)]:
        ck.save(step, {"w": jnp.full((2,), float(step))})
        ck.save_best(step, {"w": jnp.full((2,), float(step))}, {"eval_loss": loss})
    ck.wait()
    assert ck.latest.all_steps() == [2, 3]
    assert ck.best.all_steps() == [2] and ck.best_step() == 2  # the lowest loss kept, the others deleted
    best, meta = ck.restore({"w": jnp.zeros(2)}, which="best")
    np.testing.assert_array_equal(np.asarray(best["w"]), 2.0)
    assert meta["metrics"]["eval_loss"] == 1.0
    with pytest.raises(ValueError, match="needs metric 'eval_loss'"):
        ck.save_best(4, {"w": jnp.zeros(2)}, {"loss": 1.0})
    ck.close()


def _damage(step_dir: Path, how: str) -> list:
    """Damage a written checkpoint the ways a disk or a careless copy does; returns the files touched."""
    files = [p for p in step_dir.rglob("*") if p.is_file()]
    if how == "truncated_metadata":
        victims = [p for p in files if p.name == "_METADATA"]
        for p in victims:
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    else:  # zeroed data: every array data file (OCDBT's d/ folders) overwritten with zeros of the same size
        victims = [p for p in files if p.parent.name == "d"]
        for p in victims:
            p.write_bytes(b"\0" * p.stat().st_size)
    assert victims, sorted(str(p) for p in files)
    return victims


@pytest.mark.parametrize("damage", ["truncated_metadata", "zeroed_data", "nan_params"])
def test_a_damaged_latest_checkpoint_is_skipped_with_a_warning_and_the_previous_step_restored(tmp_path, damage):
    ck = Checkpointer(tmp_path, every=1, keep=3, config={"a": 1}, async_save=False)
    template = {"params": {"w": jnp.zeros((64, 32))}}
    for step in (1, 2):
        ck.save(step, {"params": {"w": jnp.full((64, 32), np.nan if damage == "nan_params" and step == 2
                                                else float(step))}})
    ck.wait()
    if damage != "nan_params":
        _damage(tmp_path / "latest" / "2", damage)
    with pytest.warns(UserWarning, match=r"skipped unreadable checkpoint\(s\): .*latest/2: .*restored step 1"):
        state, _ = ck.restore(template)
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]), 1.0)
    _damage(tmp_path / "latest" / "1", "truncated_metadata")
    with pytest.raises(CheckpointUnreadableError, match=r"no checkpoint in .*latest reads back whole \(tried 2\)"):
        ck.restore(template)
    ck.close()
