"""LoRA adapters, cached teacher targets and adapted students: primitives against plain NumPy loops, training
where the router really skips, artifacts that rebuild the same student on the base model."""
import jax
import numpy as np
import pytest

import radial_jax as rj
from radial_jax.profiling.layer_drop import drop_layers
from radial_jax.radial import RadialModel
from radial_jax.training.adapt import AdaptConfig, adapt, load_adapted, save_adapted
from radial_jax.training.lora import LoraConfig, init_adapters, merge
from radial_jax.training.loop import TrainConfig
from radial_jax.training.optim import OptimConfig
from radial_jax.training.targets import TargetBatches, TeacherTargets, compute_targets, sparse_kl

CONFIG = rj.GemmaConfig(model_type="gemma3_text", vocab_size=96, hidden_size=32, intermediate_size=48,
                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                        query_pre_attn_scalar=8, sliding_window=4, max_position_embeddings=64, pad_token_id=0)


@pytest.fixture(scope="module")
def teacher():
    model = rj.build(CONFIG, seed=0)
    leaves, tree = jax.tree_util.tree_flatten(model.params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [np.asarray(a + 0.3 * jax.random.normal(k, a.shape, a.dtype)) for a, k in zip(leaves, keys)]
    return rj.Model(CONFIG, jax.tree_util.tree_unflatten(tree, leaves), name="tiny-gemma3")


@pytest.fixture(scope="module")
def windows():
    ids = np.random.default_rng(0).integers(3, 96, (16, 12)).astype(np.int32)
    ids[:, 0] = 2  # BOS first, as the study's windows
    return ids


@pytest.fixture(scope="module")
def targets(teacher, windows):
    return compute_targets(teacher, windows, top_k=8, positions=5, oracle_threshold=0.5, batch_size=4,
                           progress=False)


def _random_adapters(params, cfg, seed=0):
    adapters = init_adapters(params, cfg, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    return {k: {"a": v["a"], "b": rng.normal(size=v["b"].shape).astype(np.float32)} for k, v in adapters.items()}


def test_merged_kernel_is_the_base_plus_scaled_low_rank_product_per_layer(teacher):
    cfg = LoraConfig(rank=3, alpha=6.0, targets=("q_proj", "fc2"))
    adapters = _random_adapters(teacher.params, cfg)
    merged = merge(teacher.params, adapters, cfg)
    for name in ("q_proj", "fc2"):
        base, a, b = (np.asarray(x, np.float64) for x in (teacher.params["layers"][name]["kernel"],
                                                          adapters[name]["a"], adapters[name]["b"]))
        for layer in range(CONFIG.num_layers):
            want = base[layer].copy()
            for r in range(3):  # the rank-one terms summed one at a time
                want += 2.0 * np.outer(a[layer, :, r], b[layer, r, :])
            np.testing.assert_allclose(merged["layers"][name]["kernel"][layer], want, rtol=1e-5, atol=1e-5)
    untouched = merged["layers"]["k_proj"]["kernel"]
    assert untouched is teacher.params["layers"]["k_proj"]["kernel"]


def test_fresh_adapters_compute_the_base_model(teacher, windows):
    cfg = LoraConfig()
    merged = merge(teacher.params, init_adapters(teacher.params, cfg, jax.random.key(0)), cfg)
    np.testing.assert_array_equal(np.asarray(teacher._with_params(merged)(windows[:2])),
                                  np.asarray(teacher(windows[:2])))


def test_lora_names_what_the_pool_has_when_a_target_is_unknown(teacher):
    with pytest.raises(ValueError, match=r"not kernels of this pool.*q_proj"):
        init_adapters(teacher.params, LoraConfig(targets=("qkv",)), jax.random.key(0))
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        LoraConfig(rank=0)


def test_sparse_kl_equals_a_plain_loop_over_positions():
    rng = np.random.default_rng(0)
    student = rng.normal(size=(2, 3, 10)).astype(np.float32)
    teacher_logp = np.log(rng.dirichlet(np.ones(10), size=(2, 3))).astype(np.float32)
    top_ids = np.argsort(-teacher_logp, -1)[..., :4]
    top_logp = np.take_along_axis(teacher_logp, top_ids, -1)
    T = 2.0
    total = 0.0
    for b in range(2):
        for p in range(3):
            t = np.exp(top_logp[b, p] / T) / np.exp(top_logp[b, p] / T).sum()
            s = np.exp(student[b, p] / T) / np.exp(student[b, p] / T).sum()
            total += sum(t[j] * (np.log(t[j]) - np.log(s[top_ids[b, p, j]])) for j in range(4))
    np.testing.assert_allclose(float(sparse_kl(student, top_ids, top_logp, T)), T * T * total / 6, rtol=1e-5)
    # all k = vocab and the student's logits the teacher's: nothing to learn
    full_ids = np.argsort(-teacher_logp, -1)
    assert abs(float(sparse_kl(teacher_logp, full_ids, np.take_along_axis(teacher_logp, full_ids, -1)))) < 1e-6


def test_cached_targets_are_the_teachers_top_tokens_at_the_sampled_positions(teacher, windows, targets):
    logits = np.asarray(teacher(windows), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    assert targets.positions.shape == (16, 5) and targets.positions.max() < 11
    for n in range(16):
        for j, pos in enumerate(targets.positions[n]):
            want = np.argsort(-logp[n, pos])[:8]
            np.testing.assert_array_equal(np.sort(targets.top_ids[n, j]), np.sort(want))
            np.testing.assert_allclose(targets.top_logp[n, j], logp[n, pos, targets.top_ids[n, j]], atol=1e-4)
    assert targets.keep.shape == (16, 4, 12) and targets.keep[:, :, 0].all()  # BOS keeps every layer
    assert not targets.keep.all(), "the oracle at 0.5 should skip some layers of this model"


def test_cached_targets_round_trip_and_a_broken_file_is_named(targets, tmp_path):
    back = TeacherTargets.load(targets.save(tmp_path / "t.npz"))
    for f in ("ids", "positions", "top_ids", "top_logp", "keep"):
        np.testing.assert_array_equal(getattr(back, f), getattr(targets, f))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="bad.npz"):
        TeacherTargets.load(tmp_path / "bad.npz")


def test_target_batches_visit_every_window_once_per_epoch(targets):
    batches = TargetBatches(targets, batch_size=4, seed=3)
    seen = np.concatenate([batches.batch(i)["ids"] for i in range(4)])
    assert sorted(map(tuple, seen)) == sorted(map(tuple, targets.ids))
    with pytest.raises(ValueError, match="batch_size must be in"):
        TargetBatches(targets, batch_size=17)


def _train(steps, lr=3e-2):
    return TrainConfig(steps=steps, batch_size=4, seq_len=12, seed=0, log_every=1, checkpoint_every=steps,
                       optim=OptimConfig(learning_rate=lr, warmup_steps=0))


def test_a_static_drop_with_adapters_moves_towards_the_teacher_and_keeps_its_base_weights(teacher, targets):
    dropped = drop_layers(teacher, [1])
    adapted, trained, history = adapt(dropped, targets, AdaptConfig(lora=LoraConfig(rank=4)), _train(25),
                                      progress=False)
    kls = [h["kl"] for h in history]
    assert kls[-1] < 0.8 * kls[0], kls
    assert set(trained) == {"lora"}
    np.testing.assert_array_equal(adapted.params["embed_tokens"]["embedding"],
                                  dropped.params["embed_tokens"]["embedding"])
    assert not np.allclose(adapted.params["layers"]["fc2"]["kernel"], dropped.params["layers"]["fc2"]["kernel"])


def test_an_adapted_router_student_skips_layers_and_its_artifact_rebuilds_it(teacher, targets, windows, tmp_path):
    student = RadialModel.from_sequential(teacher, mode="ordered", capacity_factor=1.0, cache_policy="propagate")
    cfg = AdaptConfig(lora=LoraConfig(rank=2), compute_weight=0.3, router_weight=0.5)
    adapted, trained, _ = adapt(student, targets, cfg, _train(30), run_dir=tmp_path / "run", progress=False)
    out = adapted.forward(windows)
    assert 0.0 < float(out.metrics.depth_fraction) < 1.0, "the trained router should skip some layers"
    save_adapted(tmp_path / "artifact", trained, cfg, student, base="tiny")
    size = sum(p.stat().st_size for p in (tmp_path / "artifact").iterdir())
    assert size < 0.5 * teacher.num_params * 4  # adapters and router only, not the model
    rebuilt, meta = load_adapted(tmp_path / "artifact", teacher)
    assert meta["base"] == "tiny"
    np.testing.assert_array_equal(np.asarray(rebuilt.forward(windows).logits), np.asarray(out.logits))
    with pytest.raises(ValueError, match="trained on a 4-layer student"):
        load_adapted(tmp_path / "artifact", drop_layers(teacher, [0]))


def test_the_study_compares_a_student_with_each_baselines_cheapest_point_at_or_above_its_flops():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    from real_model_study import student_vs_baselines
    rng = np.random.default_rng(0)
    rows, scores = [], []

    def add(kind, setting, flops, shift):
        rows.append({"kind": kind, "setting": setting, "layer_flops": flops, "ppl_ratio": 1.0})
        scores.append((rng.normal(100.0, 5.0, 32) + shift, np.full(32, 63.0)))

    add("adapted student", {"seed": 1, "threshold": 0.2}, 0.86, 0.0)
    add("adapted static drop", {"seed": 1, "layers_dropped": [8, 9]}, 0.889, 30.0)  # the one to compare with
    add("adapted static drop", {"seed": 0, "layers_dropped": [8, 9]}, 0.889, -30.0)  # another seed
    add("adapted static drop", {"seed": 1, "layers_dropped": [8, 9, 4]}, 0.833, -30.0)  # fewer FLOPs
    add("static layer drop", {"layers_dropped": [8]}, 0.944, 0.0)
    add("static layer drop", {"layers_dropped": []}, 1.0, 0.0)
    [entry] = student_vs_baselines(rows, scores, reps=200)
    drop = entry["baselines"]["adapted static drop"]
    assert drop["setting"] == {"seed": 1, "layers_dropped": [8, 9]} and drop["layer_flops"] == 0.889
    assert drop["high"] < 1.0  # 30 nats per window better: the interval excludes 1
    assert entry["baselines"]["static layer drop"]["layer_flops"] == 0.944
    assert entry["baselines"]["layer oracle"] is None  # no point of it at all
