"""Training pieces against independent references: losses vs numpy, schedule vs its formula,
pipeline determinism/sharding/resume, LM loss falling below the unigram entropy, distillation
beating the untrained router, evaluation outputs, the CLI end to end."""
import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import radial_jax as rj
from radial_jax.models.perplexity import lm_cross_entropy
from radial_jax.training import losses
from radial_jax.training.distill import distill, make_distill_eval
from radial_jax.training.distill_loss import DistillConfig, keep_logits_ordered, make_student, without_router
from radial_jax.training.loop import TrainConfig
from radial_jax.training.optim import OptimConfig, make_optimizer, make_schedule
from radial_jax.data.packed import PackedDataset, text_data

RNG = np.random.default_rng(0)


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# -- losses vs numpy loops ------------------------------------------------------------------------------
def test_lm_cross_entropy_matches_numpy_loop():
    logits = RNG.normal(size=(2, 5, 7)).astype(np.float32)
    ids = RNG.integers(0, 7, (2, 5))
    mask = np.array([[0, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
    tot, n = 0.0, 0
    for b in range(2):
        for i in range(4):
            if mask[b, i] and mask[b, i + 1]:
                tot -= np_log_softmax(logits[b, i])[ids[b, i + 1]]
                n += 1
    loss, count = lm_cross_entropy(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask))
    assert int(count) == n
    np.testing.assert_allclose(float(loss), tot / n, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_distill_kl_matches_numpy(temperature):
    s, t = RNG.normal(size=(2, 3, 6)), RNG.normal(size=(2, 3, 6))
    ps, pt = np_log_softmax(s / temperature), np_log_softmax(t / temperature)
    ref = temperature ** 2 * np.mean(np.sum(np.exp(pt) * (pt - ps), -1))
    np.testing.assert_allclose(float(losses.distill_kl(jnp.asarray(s), jnp.asarray(t), temperature=temperature)),
                               ref, rtol=1e-5)
    assert abs(float(losses.distill_kl(jnp.asarray(t), jnp.asarray(t)))) < 1e-6
    with pytest.raises(ValueError, match="temperature"):
        losses.distill_kl(jnp.asarray(s), jnp.asarray(t), temperature=0.0)


def test_router_losses_match_numpy():
    x = RNG.normal(size=(3, 2, 4))
    y = RNG.integers(0, 2, (3, 2, 4))
    p = 1 / (1 + np.exp(-x))
    ref = np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p)))
    np.testing.assert_allclose(float(losses.router_keep_bce(jnp.asarray(x), jnp.asarray(y))), ref, rtol=1e-5)
    # radial mode's anchor: the ordered path as router columns, then cross-entropy on active (step, token)s
    L = y.shape[0]
    want = np.empty_like(y)
    for l, b, t in np.ndindex(y.shape):
        want[l, b, t] = l if y[l, b, t] else (L if y[l:, b, t].any() else L + 1)
    targets = np.asarray(losses.ordered_route_targets(jnp.asarray(y)))
    np.testing.assert_array_equal(targets, want)
    logits5 = RNG.normal(size=(L, 2, 4, L + 2))
    w = RNG.integers(0, 2, (L, 2, 4))
    terms = [np.log(np.exp(logits5[i]).sum()) - logits5[i][want[i]] for i in np.ndindex(w.shape) if w[i]]
    np.testing.assert_allclose(float(losses.router_route_ce(jnp.asarray(logits5), jnp.asarray(want),
                                                            jnp.asarray(w))), np.mean(terms), rtol=1e-5)
    logits = RNG.normal(size=(2, 2, 4, 5))
    ref_z = np.mean(np.log(np.exp(logits).sum(-1)) ** 2)
    np.testing.assert_allclose(float(losses.router_z_loss(jnp.asarray(logits))), ref_z, rtol=1e-5)
    # load balance: uniform dispatch and probabilities give 1; all on one layer with prob 1 gives L
    s, b, t, L = 2, 2, 6, 3
    probs = np.full((s, b, t, L + 1), 1 / (L + 1))
    disp = np.zeros((s, b, t, L))
    for i in range(t):
        disp[:, :, i, i % L] = 1
    np.testing.assert_allclose(float(losses.load_balance(jnp.asarray(probs), jnp.asarray(disp))), 1.0, rtol=1e-5)
    # mass moved from the layers to skip / exit (same proportions among layers) changes nothing
    moved = probs.copy(); moved[..., :L] *= 0.25; moved[..., L] = 1 - moved[..., :L].sum(-1)
    np.testing.assert_allclose(float(losses.load_balance(jnp.asarray(moved), jnp.asarray(disp))), 1.0, rtol=1e-5)
    # random probabilities and dispatch against a loop over decisions
    pr = RNG.dirichlet(np.ones(L + 2), size=(s, b, t))
    dr = RNG.integers(0, 2, (s, b, t, L))
    among = [pr[i][:L] / pr[i][:L].sum() for i in np.ndindex(s, b, t)]
    f = dr.reshape(-1, L).sum(0) / (s * b * t)
    np.testing.assert_allclose(float(losses.load_balance(jnp.asarray(pr), jnp.asarray(dr))),
                               L * np.sum(f / f.sum() * np.mean(among, 0)), rtol=1e-5)
    probs1 = np.zeros((s, b, t, L + 1)); probs1[..., 0] = 1
    disp1 = np.zeros((s, b, t, L)); disp1[..., 0] = 1
    np.testing.assert_allclose(float(losses.load_balance(jnp.asarray(probs1), jnp.asarray(disp1))), L, rtol=1e-5)
    np.testing.assert_allclose(float(losses.compute_penalty(jnp.full((2, 3), 1.5), 3)), 0.5)
    h_s, h_t = RNG.normal(size=(2, 3, 4)), RNG.normal(size=(2, 3, 4))
    np.testing.assert_allclose(float(losses.hidden_match(jnp.asarray(h_s), jnp.asarray(h_t))),
                               np.mean(((h_s - h_t) ** 2).sum(-1) / (h_t ** 2).sum(-1)), rtol=1e-5)


# -- optimiser -----------------------------------------------------------------------------------------
def test_schedule_warmup_then_cosine():
    cfg = OptimConfig(learning_rate=1.0, warmup_steps=10, decay_steps=110, final_lr_fraction=0.1)
    sched = make_schedule(cfg)
    for step in [0, 5, 10, 60, 110]:
        if step <= 10:
            ref = step / 10
        else:
            ref = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 10) / 100))
        np.testing.assert_allclose(float(sched(step)), ref, rtol=1e-5, atol=1e-7)


def test_frozen_parameters_do_not_move_and_clipping_bounds_update():
    params = {"router": {"w": jnp.ones(3)}, "base": {"w": jnp.ones(3)}}
    tx = make_optimizer(OptimConfig(learning_rate=0.1, warmup_steps=0, weight_decay=0.0), params=params,
                        trainable=lambda p: p.startswith("router"))
    grads = {"router": {"w": jnp.full(3, 100.0)}, "base": {"w": jnp.full(3, 100.0)}}
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(np.asarray(updates["base"]["w"]), 0.0)
    assert np.all(np.asarray(updates["router"]["w"]) < 0)
    with pytest.raises(ValueError, match="selects no parameter"):
        make_optimizer(OptimConfig(), params=params, trainable=lambda p: False)
    with pytest.raises(ValueError, match="learning_rate"):
        OptimConfig(learning_rate=0.0)


# -- pipeline --------------------------------------------------------------------------------------------
def test_pipeline_deterministic_sharded_resumable():
    tokens = np.arange(1000, dtype=np.int32)
    ds = PackedDataset(tokens, 10, 8, seed=3)
    assert ds.num_windows == 100 and ds.batches_per_epoch == 12
    # one epoch visits distinct windows, each a contiguous slice of the stream
    seen = np.concatenate([ds.global_batch(p) for p in range(12)])
    assert len({int(r[0]) for r in seen}) == 96 and np.all(np.diff(seen, axis=1) == 1)
    assert all(int(r[0]) % 10 == 0 for r in seen)
    # a different epoch has a different order; same position is always the same batch
    assert not np.array_equal(ds.global_batch(0), ds.global_batch(12))
    np.testing.assert_array_equal(ds.global_batch(17), PackedDataset(tokens, 10, 8, seed=3).global_batch(17))
    resumed = [b for _, b in ds.iterate(start=5, stop=9)]
    np.testing.assert_array_equal(np.stack(resumed), np.stack([ds.batch(p) for p in range(5, 9)]))
    # processes hold disjoint contiguous rows that make up the global batch
    parts = [PackedDataset(tokens, 10, 8, seed=3, process_index=i, process_count=4).batch(7) for i in range(4)]
    np.testing.assert_array_equal(np.concatenate(parts), ds.global_batch(7))
    with pytest.raises(ValueError, match="divisible by process_count"):
        PackedDataset(tokens, 10, 6, process_count=4)
    with pytest.raises(ValueError, match="need at least batch_size"):
        PackedDataset(tokens[:50], 10, 8)
    with pytest.raises(ValueError, match="no text at no/such/source"):
        text_data("no/such/source")


# -- LM training on the embedded corpus --------------------------------------------------------------
SMALL = dict(hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def corpus():
    return text_data("embedded")


@pytest.fixture(scope="module")
def teacher(corpus):
    from radial_jax.training.lm import train_lm
    # 300 updates: enough to beat the unigram entropy of the 2048-token BPE corpus by a clear margin
    cfg = rj.OPTConfig(vocab_size=corpus.vocab_size, **{**SMALL, "hidden_size": 48, "ffn_dim": 96})
    model, history = train_lm(cfg, corpus, 300, train=TrainConfig(batch_size=16, seq_len=32, log_every=20,
                                                                 optim=OptimConfig(learning_rate=5e-3)),
                              progress=False)
    return model, history


def test_lm_loss_falls_below_unigram_entropy(corpus, teacher):
    model, history = teacher
    train = [h["loss"] for h in history if "loss" in h]
    assert train[-1] < train[0] - 0.5, train
    # independent reference: the unigram entropy of the held-out stream (a model that learned nothing
    # about context cannot beat it)
    counts = np.bincount(corpus.train, minlength=corpus.vocab_size) + 1.0
    p = counts / counts.sum()
    unigram = float(-np.mean(np.log(p[corpus.eval])))
    final_eval = [h for h in history if h.get("split") == "eval"][-1]["eval_loss"]
    assert final_eval < unigram, (final_eval, unigram)
    assert math.log(corpus.vocab_size) > unigram


# -- distillation into a Radial Network, evaluation, CLI, joint training --------------------------------------
def _median_probe_ratio(model, ids):
    """A data-driven oracle threshold: the median whole-layer ratio the oracle probe sees (threshold 0)."""
    from radial_jax.radial import RadialModel
    oracle = RadialModel.from_sequential(model, routing="oracle", cache_policy="propagate")
    return float(np.median(np.asarray(oracle.forward(ids, threshold=0.0).router.ratio)))


def _distill_train(steps_lr=1e-2):
    return TrainConfig(batch_size=8, seq_len=32, log_every=10, optim=OptimConfig(learning_rate=steps_lr,
                                                                                   warmup_steps=5))


def test_distillation_lowers_kl_below_untrained_router(corpus, teacher):
    model, _ = teacher
    windows = corpus.dataset(32, 1, split="eval").all_windows(64)
    threshold = _median_probe_ratio(model, windows[:16])
    cfg = DistillConfig(oracle_threshold=threshold, compute_weight=0.05, train="router")
    student, history = distill(model, corpus, 40, cfg=cfg, train=_distill_train(), progress=False)
    ev = make_distill_eval(student, windows, model)
    untrained, trained = ev(make_student(model, cfg).params), ev(student.params)
    assert trained["eval_loss"] < untrained["eval_loss"], (trained, untrained)
    assert trained["eval_depth"] < 1.0  # it does skip layers
    assert [h for h in history if "router_loss" in h]
    # router-only: the layers, embeddings and head are bitwise the teacher's
    for a, b in zip(jax.tree_util.tree_leaves(without_router(student.params)),
                    jax.tree_util.tree_leaves(model.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_distill_all_moves_layers_then_radial_mode_continues(corpus, teacher):
    model, _ = teacher
    cfg = DistillConfig(train="all", hidden_weight=0.5, oracle_threshold=0.3)
    small = TrainConfig(batch_size=4, seq_len=16, log_every=1)
    student, history = distill(model, corpus, 3, cfg=cfg, train=small, progress=False)
    assert all(np.isfinite(h["hidden"]) for h in history if "hidden" in h)
    moved = [not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree_util.tree_leaves(without_router(student.params)),
                             jax.tree_util.tree_leaves(model.params))]
    assert any(moved)
    # radial mode, warm-started from the ordered student
    radial, more = distill(model, corpus, 2, cfg=dataclasses.replace(cfg, train="router"), mode="radial",
                           start=student, train=small, progress=False)
    assert radial.radial.mode == "radial" and all(np.isfinite(h["balance"]) for h in more if "balance" in h)
    assert any("router_loss" in h for h in more), "radial mode keeps the oracle's supervision"
    assert all(np.isfinite(h["router_loss"]) for h in more if "router_loss" in h)
    assert all(0 <= h["drop_rate"] <= 1 for h in more if "drop_rate" in h)
    other = make_student(model, cfg, mode="ordered", router_hidden=8)
    with pytest.raises(ValueError, match="cannot continue"):
        distill(model, corpus, 1, cfg=cfg, start=other, train=small, progress=False)
    with pytest.raises(ValueError, match="train must be one of"):
        DistillConfig(train="layers")


def test_radial_phase_config_changes_its_three_settings_and_keeps_the_rest():
    from radial_jax import defaults as D
    base = DistillConfig(temperature=3.0, compute_weight=0.9, train="all", oracle_threshold=0.4)
    assert base.radial_phase() == DistillConfig(temperature=3.0, compute_weight=D.RADIAL_COMPUTE_WEIGHT,
                                                train=D.RADIAL_DISTILL_TRAIN,
                                                oracle_threshold=D.RADIAL_ORACLE_THRESHOLD)
    assert base.radial_phase(0.1, "all", 0.2) == dataclasses.replace(base, compute_weight=0.1, oracle_threshold=0.2)
    with pytest.raises(ValueError, match="train must be one of"):
        base.radial_phase(train="layers")


def test_keep_logits_ordered_against_loop():
    # float32 on both sides and one subtraction per entry: the result is exact, whatever values are drawn
    lg = np.random.default_rng(7).normal(size=(3, 2, 4, 5)).astype(np.float32)  # 3 layers, skip (3), exit (4)
    ref = np.stack([lg[s, ..., s] - lg[s, ..., 3] for s in range(3)])
    np.testing.assert_array_equal(np.asarray(keep_logits_ordered(jnp.asarray(lg))), ref)


def test_evaluate_curves_meet_the_teacher_and_the_empty_network(tmp_path, teacher, corpus):
    from radial_jax.training.evaluate import evaluate
    model, _ = teacher
    student = make_student(model)
    windows = corpus.dataset(32, 1, split="eval").all_windows(16)  # one batch of evaluate's default 16
    res = evaluate(student, model, windows, thresholds=(0.0, 0.3, 2.0), offsets=(-30.0, 0.0, 30.0),
                   png=tmp_path / "c.png", out_json=tmp_path / "e.json", progress=False)
    assert (tmp_path / "c.png").stat().st_size > 1000 and json.loads((tmp_path / "e.json").read_text())
    teacher_ppl = res["teacher"]["ppl"]
    o = {c["threshold"]: c for c in res["oracle_curve"]}
    np.testing.assert_allclose(o[0.0]["ppl"], teacher_ppl, rtol=1e-5)
    assert o[0.0]["depth"] == 1.0 and o[2.0]["depth"] == 0.0
    s = {c["offset"]: c for c in res["student"]["curve"]}
    assert s[30.0]["depth"] == 1.0 and s[-30.0]["depth"] == 0.0
    np.testing.assert_allclose(s[30.0]["ppl"], teacher_ppl, rtol=1e-5)  # straight-through gate: value 1
    blocks = {c["threshold"]: c for c in res["block_oracle_curve"]}  # through the sequential model
    np.testing.assert_allclose(blocks[0.0]["ppl"], teacher_ppl, rtol=1e-5)
    assert blocks[0.0]["depth"] == 1.0 and blocks[2.0]["depth"] == 0.0
    # depth 0, written in numpy: logits = head(final_norm(token + position embeddings))
    p = jax.tree_util.tree_map(np.asarray, model.params)
    t = windows.shape[1]
    x = p["embed_tokens"]["embedding"][windows] + p["embed_positions"]["embedding"][np.arange(t) + 2]
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    logits = (x * p["final_norm"]["scale"] + p["final_norm"]["bias"]) @ p["embed_tokens"]["embedding"].T
    logp = np_log_softmax(logits[:, :-1].astype(np.float64))
    ppl0 = float(np.exp(-np.mean(np.take_along_axis(logp, windows[:, 1:, None], -1))))
    for row in (o[2.0], s[-30.0], blocks[2.0]):
        np.testing.assert_allclose(row["ppl"], ppl0, rtol=1e-4)
    with pytest.raises(ValueError, match="eval windows"):
        evaluate(student, model, windows[:3], progress=False)


def test_cli_train_distill_eval(tmp_path, capsys):
    from radial_jax.cli import main
    tokens = tmp_path / "corpus.txt"
    tokens.write_text(("the quick brown fox jumps over the lazy dog. " * 200))
    assert main(["train", "--size", "tiny", "--steps", "6", "--batch-size", "4", "--seq-len", "16",
                 "--data", str(tokens), "--run-dir", str(tmp_path / "t"), "--no-progress", "--debug"]) == 0
    assert (tmp_path / "t" / "metrics.jsonl").is_file() and list((tmp_path / "t" / "tensorboard").iterdir())
    assert main(["distill", "--teacher", str(tmp_path / "t" / "model"), "--steps", "4", "--batch-size", "4",
                 "--seq-len", "16", "--data", str(tokens), "--run-dir", str(tmp_path / "s"), "--no-progress",
                 "--radial-steps", "2", "--radial-train", "router", "--radial-oracle-threshold", "0.3"]) == 0
    assert main(["eval", "--student", str(tmp_path / "s" / "student"), "--data", str(tokens), "--seq-len", "16",
                 "--max-windows", "16", "--out", str(tmp_path / "e"), "--no-progress"]) == 0
    res = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert res["student"]["radial_config"]["mode"] == "radial"
    # the warm start keeps each step's layer budget: capacity factor 1 over L = 2 layers becomes 2 in radial mode;
    # eval serves the student at the capacity its routes need (at most that)
    from radial_jax.radial.artifacts import load_student
    student, meta = load_student(tmp_path / "s" / "student")
    assert student.radial.capacity_factor == 2.0
    # the saved config is the radial phase's, the one the student was last trained with
    assert meta["distill"]["train"] == "router" and meta["distill"]["oracle_threshold"] == 0.3
    assert 0 < res["student"]["radial_config"]["capacity_factor"] <= 2.0
    assert 0.0 <= res["student"]["depth"] <= 1.0 and (tmp_path / "e" / "curve.png").is_file()
    capsys.readouterr()
    # bad input: a one-line error naming what was wrong, exit status 2 (no traceback)
    assert main(["eval", "--student", str(tmp_path), "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "radial-jax eval: error:" in err and "not a radial_jax training artifact" in err
    lm = str(tmp_path / "t" / "model")
    assert main(["eval", "--student", lm, "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "holds a 'lm' artifact" in err and "Traceback" not in err
    # what `train` wrote is a model every command loads by path, with the tokenizer it was trained with
    from radial_jax.checkpoints.artifacts import load_model
    saved, loaded = load_model(lm), rj.load(lm)
    ids = np.arange(12).reshape(2, 6)
    np.testing.assert_array_equal(np.asarray(loaded(ids)), np.asarray(saved(ids)))
    assert loaded.tokenizer_path == saved.tokenizer_path and loaded.name == lm
    assert rj.load(lm, dtype="bfloat16").params["embed_tokens"]["embedding"].dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="trained with radial_jax"):
        rj.load(lm, gguf_file="x.gguf")


def test_cli_train_that_diverges_ends_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    from radial_jax.cli import main
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    argv = ["train", "--size", "tiny", "--steps", "8", "--batch-size", "4", "--seq-len", "16", "--data", str(text),
            "--run-dir", str(tmp_path / "t"), "--no-progress", "--lr", "1e30", "--checkpoint-every", "1"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("radial-jax train: error: non-finite loss") and err.count("\n") == 1, err
    assert "last good checkpoint is intact" in err and "Traceback" not in err
    steps = [int(d.name) for d in (tmp_path / "t" / "checkpoints" / "latest").iterdir() if d.name.isdigit()]
    assert steps and max(steps) < 8  # the steps before the divergence were checkpointed; the bad one was not


def test_joint_training_from_scratch_schedule_and_capacity(corpus):
    from radial_jax.training.joint import JointConfig, train_joint
    cfg = rj.OPTConfig(vocab_size=corpus.vocab_size, **SMALL)
    jc = JointConfig(capacity_start=1.0, capacity_end=0.5, capacity_steps=20, capacity_stages=3, route_start=10)
    network, history = train_joint(cfg, corpus, 40, cfg=jc, train=TrainConfig(
        batch_size=8, seq_len=32, log_every=10, optim=OptimConfig(learning_rate=1e-2, warmup_steps=5)),
        progress=False)
    rows = [h for h in history if "lm" in h]
    # logged after updates 10, 20, 30, 40 (0-based update 9, 19, 29, 39): identity warm-up for 10 updates,
    # then capacity 1.0 -> 0.75 -> 0.5 in three stages of 20 / 3 updates
    assert [r["capacity"] for r in rows] == [1.0, 0.75, 0.5, 0.5]
    assert rows[0]["hard_depth"] == 1.0  # identity routing: every layer
    assert rows[-1]["lm"] < rows[0]["lm"] and rows[-1]["lm"] < math.log(corpus.vocab_size) - 1.0, rows
    assert network.radial.routing == "learned" and network.radial.capacity_factor == 0.5
    # the budget holds: no layer admits more than floor(0.5 * (p + 1)) + 1 of a sequence's first p + 1 tokens
    ids = jnp.asarray(RNG.integers(3, cfg.vocab_size, (2, 10)).astype(np.int32))
    out = network.forward(ids)
    assert int(out.metrics.capacity) == 6
    admitted = np.cumsum(np.asarray(out.router.assign), axis=2)  # [S, b, t, L]
    assert (admitted <= (np.floor(0.5 * (np.arange(10) + 1)) + 1)[None, None, :, None]).all()
    with pytest.raises(ValueError, match="capacities"):
        JointConfig(capacity_end=0.0)


def test_pipeline_command_end_to_end_and_a_rerun_reuses_every_stage(tmp_path, capsys):
    """``radial-jax pipeline`` on tiny settings: every stage's output (the ordered and the radial student,
    evaluation, serving speed, the README figures), the ``--distill-train`` and ``--radial-train`` flags
    honoured (router-only ordered phase: the ordered student's layers are bitwise the teacher's; the radial
    phase training everything moves them), and a rerun that reuses every stage."""
    from radial_jax.cli import main
    from radial_jax.checkpoints.artifacts import load_model
    from radial_jax.radial.artifacts import load_student
    out = tmp_path / "p"
    argv = ["pipeline", "--out", str(out), "--size", "tiny", "--teacher-steps", "4", "--distill-steps", "2",
            "--radial-steps", "2", "--window", "8", "--batch-size", "4", "--max-windows", "8", "--thresholds",
            "0,0.3", "--serve-repeats", "1", "--serve-tokens", "2", "--results", str(tmp_path / "r.json"),
            "--radial-train", "all", "--distill-train", "router"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["students"]) == {"ordered", "radial"}
    # one window set and one perplexity: the oracle at threshold 0 is the teacher that evaluation reports
    assert summary["oracle"][0]["perplexity"] == pytest.approx(summary["teacher_perplexity"], rel=1e-6)
    for name, s in summary["students"].items():
        assert s["mode"] == name and 0 <= s["depth_fraction"] <= 1 and s["executed_flops_fraction"] > 0
        # timed, not asserted: 2 decode steps of a tiny model are within timing noise
        assert math.isfinite(s["speed"]["decode_b1_speedup"]["median"]) and s["speed"]["prefill_speedup"]["n"] == 1
    # the half-depth baseline: half the teacher's layers on the same tokens, paired against teacher and students
    half = summary["half_depth"]
    assert load_model(out / "half_depth").config.num_layers == half["layers"] == 1
    assert half["layer_flops_fraction"] == pytest.approx(0.5)
    # one perplexity: evaluate's teacher row equals the half model's (paired scoring) x the paired ratio, whose
    # teacher side is evaluate's per-window NLL (that equals the paired scoring's: test_perplexity)
    assert half["perplexity"] * half["teacher_vs_half"]["ratio"] == pytest.approx(summary["teacher_perplexity"],
                                                                                   rel=1e-5)
    for s in summary["students"].values():
        assert s["vs_half"]["low"] <= s["vs_half"]["ratio"] <= s["vs_half"]["high"]
    for f in ("profile/profile.json", "simulate/simulation.json", "distill/eval.json", "distill/curve.png",
              "distill/radial_routes.png", "serve/speed.json", "compare/half_depth.json"):
        assert (out / f).is_file(), f
    figures = json.loads((tmp_path / "r.json").read_text())["figures"]
    assert {f["key"] for f in figures} >= {"pipeline_teacher", "pipeline_ordered", "pipeline_radial",
                                          "pipeline_depth_pays", "pipeline_ordered_vs_half"}
    teacher = load_model(out / "teacher")
    layers = {}
    for mode, trained in (("ordered", "router"), ("radial", "all")):
        student, meta = load_student(out / "distill" / mode)
        assert meta["distill"]["train"] == trained and student.radial.mode == mode
        layers[mode] = [np.asarray(a) for a in jax.tree_util.tree_leaves(without_router(student.params))]
    for a, b in zip(layers["ordered"], jax.tree_util.tree_leaves(teacher.params)):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert any(not np.array_equal(a, b) for a, b in zip(layers["radial"], layers["ordered"]))
    before = {f: (out / f).stat().st_mtime_ns for f in ("teacher/params.msgpack", "distill/eval.json",
                                                        "serve/speed.json", "half_depth/params.msgpack",
                                                        "compare/half_depth.json")}
    capsys.readouterr()
    assert main(argv) == 0  # a rerun finds every stage done and rewrites none
    assert "reusing" in capsys.readouterr().out
    assert {f: (out / f).stat().st_mtime_ns for f in before} == before
    with pytest.raises(SystemExit):
        main(argv[:-1] + ["layers"])  # --distill-train allows only router / all


def test_the_study_driver_refuses_a_sequence_of_phases_a_student_cannot_follow_before_any_work():
    from radial_jax.training.study import Phase, distill_phases, ordered_then_radial
    train = TrainConfig(steps=2, batch_size=2, seq_len=8)
    assert [p.mode for p in ordered_then_radial(DistillConfig(), train)] == ["ordered"]
    both = ordered_then_radial(DistillConfig(), train, train)
    assert [p.mode for p in both] == ["ordered", "radial"] and both[1].cfg == DistillConfig().radial_phase()
    for modes in (["radial", "ordered"], ["ordered", "ordered"], [], ["radial", "radial"]):
        with pytest.raises(ValueError, match="cannot follow one another"):  # the teacher is never touched
            distill_phases(None, None, [Phase(m, train) for m in modes], run_dirs={})
    with pytest.raises(ValueError, match="run_dirs has no directory"):
        distill_phases(None, None, both, run_dirs={"ordered": None})
    with pytest.raises(ValueError, match="mode must be one of"):
        Phase("sideways", train)
