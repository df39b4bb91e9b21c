"""Profiler and oracle against independent references: forward hooks on transformers (PyTorch) models,
numpy statistics, and transformers' own loss for perplexity."""
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, ViTForImageClassification

import radial_jax as rj
from conftest import xla_flags
from radial_jax.profiling.stats import SKETCH_RELATIVE_ERROR, RatioAccumulator


def _first(t):
    return t[0] if isinstance(t, tuple) else t


def hf_block_ratios(layers, run, post_ln: bool, attn_name: str, mlp_name: str, attn_norm_name=None):
    """Per-layer ``{block: (|x|, |f|, |x + f|)}`` captured with forward hooks, written independently of ours."""
    captured = [dict() for _ in layers]
    handles = []
    for i, layer in enumerate(layers):
        c = captured[i]
        handles.append(layer.register_forward_pre_hook(
            lambda m, args, kwargs, c=c: c.__setitem__("x", (args[0] if args else kwargs["hidden_states"]).clone()),
            with_kwargs=True))
        handles.append(layer.get_submodule(attn_name).register_forward_hook(
            lambda m, a, o, c=c: c.__setitem__("f_attn", _first(o).clone())))
        handles.append(layer.get_submodule(mlp_name).register_forward_hook(
            lambda m, a, o, c=c: c.__setitem__("f_mlp", _first(o).clone())))
        if post_ln:
            handles.append(layer.get_submodule(attn_norm_name).register_forward_hook(
                lambda m, a, o, c=c: c.__setitem__("x_mlp", o.clone())))
        handles.append(layer.register_forward_hook(lambda m, a, o, c=c: c.__setitem__("y", _first(o).clone())))
    with torch.no_grad():
        run()
    for h in handles:
        h.remove()
    out = []
    n = lambda t: t.double().norm(dim=-1).numpy()
    for c in captured:
        c["f_mlp"] = c["f_mlp"].reshape(c["x"].shape)  # OPT runs its MLP on flattened [b * t, e]
        x_mlp = c["x_mlp"] if post_ln else c["x"] + c["f_attn"]
        blocks = {"attn": (c["x"], c["f_attn"]), "mlp": (x_mlp, c["f_mlp"]), "layer": (c["x"], c["y"] - c["x"])}
        out.append({b: (n(x), n(f), n(x + f)) for b, (x, f) in blocks.items()})
    return out


def check_against_hooks(result, hooks, valid):
    for kind in ("out", "in"):
        for block in ("attn", "mlp", "layer"):
            got = result.raw[f"{block}_{kind}"]  # [L, n]
            for i, h in enumerate(hooks):
                x, f, y = h[block]
                expected = (f / y if kind == "out" else f / x)[valid]
                np.testing.assert_allclose(got[i], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_projection"])
def test_opt_ratios_match_transformers_hooks(tiny_opt_variants, variant):
    path = tiny_opt_variants[variant]
    model = rj.load(path)
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    rng = np.random.default_rng(0)
    ids = rng.integers(3, model.config.vocab_size, (3, 10))
    mask = np.ones_like(ids, bool)
    mask[1, 7:] = False  # padding must not count
    result = rj.profile(model, [(ids, mask)], keep_raw=True, progress=False)
    hooks = hf_block_ratios(ref.model.decoder.layers,
                            lambda: ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(int))),
                            post_ln=not ref.config.do_layer_norm_before, attn_name="self_attn", mlp_name="fc2",
                            attn_norm_name="self_attn_layer_norm")
    check_against_hooks(result, hooks, mask)
    assert result.tokens == mask.sum()


def test_vit_ratios_match_transformers_hooks(tiny_vit_cls_dir):
    model = rj.load(tiny_vit_cls_dir)
    ref = ViTForImageClassification.from_pretrained(tiny_vit_cls_dir).eval()
    pixels = np.random.default_rng(1).normal(size=(2, 3, 16, 16)).astype(np.float32)
    result = rj.profile(model, [pixels], keep_raw=True, progress=False)
    if hasattr(ref.vit, "layers"):  # transformers >= 5 module layout
        layers, attn_name, mlp_name = ref.vit.layers, "attention.o_proj", "mlp.fc2"
    else:
        layers, attn_name, mlp_name = ref.vit.encoder.layer, "attention.output.dense", "output.dense"
    hooks = hf_block_ratios(layers, lambda: ref(pixel_values=torch.tensor(pixels)), post_ln=False,
                            attn_name=attn_name, mlp_name=mlp_name)
    check_against_hooks(result, hooks, np.ones((2, 17), bool))


def test_statistics_equal_numpy_on_raw_values(tiny_opt_dir, tmp_path):
    model = rj.load(tiny_opt_dir)
    ids = np.random.default_rng(2).integers(3, model.config.vocab_size, (4, 12))
    result = rj.profile(model, [(ids[:2], None), (ids[2:], None)], keep_raw=True, progress=False)
    for kind in ("out", "in"):
        pooled = np.concatenate([result.raw[f"attn_{kind}"].ravel(), result.raw[f"mlp_{kind}"].ravel()])
        for name, q in (("median", 0.5), ("p10", 0.1), ("p90", 0.9)):
            assert result.stat(name, kind) == pytest.approx(np.quantile(pooled.astype(np.float64), q), rel=1e-5)
        assert result.stat("mean", kind) == pytest.approx(pooled.mean(), rel=1e-5)
        per_layer = result.raw[f"mlp_{kind}"][1]
        assert result.stat("median", kind, "mlp", 1) == pytest.approx(np.median(per_layer), rel=1e-5)
    saved = json.loads((result.save(tmp_path) / "profile.json").read_text())
    assert saved["default_ratio"] == "ratio_out" and saved["median_ratio_out"] == pytest.approx(result.median)
    assert (tmp_path / "per_layer.png").stat().st_size > 0 and (tmp_path / "per_layer.csv").exists()


def test_sketch_quantiles_within_stated_bound():
    values = np.random.default_rng(3).lognormal(-2.5, 1.0, 50_000)
    exact, sketch = RatioAccumulator(), RatioAccumulator(exact_limit=10)
    for chunk in np.array_split(values, 7):
        exact.add(chunk)
        part = RatioAccumulator(exact_limit=10)
        part.add(chunk)
        sketch.merge(part)  # merged shards, as across hosts
    assert exact.exact and not sketch.exact
    for q in (0.1, 0.5, 0.9):
        truth = np.quantile(values, q)
        assert exact.quantile(q) == pytest.approx(truth, rel=1e-6)
        assert abs(sketch.quantile(q) / truth - 1) <= SKETCH_RELATIVE_ERROR * 1.01
    assert sketch.summary()["relative_error_bound"] == SKETCH_RELATIVE_ERROR


def test_oracle_threshold_zero_is_the_full_model(tiny_opt_dir):
    model = rj.load(tiny_opt_dir)
    ref = AutoModelForCausalLM.from_pretrained(tiny_opt_dir).eval()
    ids = np.random.default_rng(4).integers(3, model.config.vocab_size, (2, 16))
    (full,) = rj.simulate_skipping(model, [(ids, None)], [0.0], progress=False).results
    with torch.no_grad():  # transformers' own mean next-token loss
        loss = ref(input_ids=torch.tensor(ids), labels=torch.tensor(ids)).loss.item()
    assert full.perplexity == pytest.approx(np.exp(loss), rel=1e-4)
    assert full.mean_depth == 2 * model.config.num_layers and full.flops_kept == 1.0
    # Logits at t = 0 are bitwise the full model's.
    np.testing.assert_array_equal(np.asarray(model.forward(ids, threshold=np.float32(0.0)).logits),
                                  np.asarray(model(ids)))


def test_threshold_above_every_ratio_gives_depth_zero(tiny_opt_dir):
    """ratio_out can exceed 1 (an update against its input), so make every ratio small first: with
    embeddings 1000x larger, the pre-LN blocks' updates (LN makes them scale-free) are tiny beside x."""
    model = rj.load(tiny_opt_dir)
    params = {**model.params, "embed_tokens": {"embedding": model.params["embed_tokens"]["embedding"] * 1000},
              "embed_positions": {"embedding": model.params["embed_positions"]["embedding"] * 1000}}
    big = rj.Model(model.config, params, name="big-embeddings")
    ids = np.random.default_rng(4).integers(3, model.config.vocab_size, (2, 16))
    ratios = rj.profile(big, [(ids, None)], keep_raw=True, progress=False).raw
    top = max(ratios["attn_out"].max(), ratios["mlp_out"].max())
    assert top < 0.5
    # the all-skipped stream is the embeddings; its ratios are below 1 too, so t = 1 skips everything
    none = rj.simulate_skipping(big, [(ids, None)], [1.0], progress=False).results[0]
    assert none.mean_depth == 0 and none.flops_kept == 0.0 and none.depth_histogram[0] == ids.size


def test_oracle_skips_exactly_the_blocks_under_threshold(tiny_opt_dir):
    """A plain re-implementation of the rule with per-block calls decides the same blocks."""
    model = rj.load(tiny_opt_dir)
    ids = np.random.default_rng(5).integers(3, model.config.vocab_size, (2, 9))
    t = float(np.median(rj.profile(model, [(ids, None)], keep_raw=True, progress=False).raw["mlp_out"]))
    sim = rj.simulate_skipping(model, [(ids, None)], [t], progress=False).results[0]
    out = model.forward(ids, threshold=np.float32(t))
    keep = np.asarray(out.stats.mlp.keep) & (np.asarray(out.stats.mlp.ratio("out")) >= t)
    assert np.array_equal(keep, np.asarray(out.stats.mlp.keep))
    assert 0 < sim.mean_depth < 2 * model.config.num_layers


def test_vit_oracle_agreement(tiny_vit_cls_dir):
    model = rj.load(tiny_vit_cls_dir)
    pixels = np.random.default_rng(6).normal(size=(3, 3, 16, 16)).astype(np.float32)
    full, none = rj.simulate_skipping(model, [pixels], [0.0, 1.0], progress=False).results
    assert full.top1_agreement == 1.0 and full.embedding_cosine == pytest.approx(1.0, abs=1e-6)
    assert none.mean_depth == 0


def test_bad_inputs(tiny_opt_dir):
    model = rj.load(tiny_opt_dir)
    ids = np.ones((1, 4), np.int32)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        rj.simulate_skipping(model, [(ids, None)], [0.1, 1.5], progress=False)
    with pytest.raises(ValueError, match="no data"):
        rj.profile(model, [], progress=False)
    with pytest.raises(ValueError, match="num_hidden_layers must be an integer >= 1"):  # a model without blocks
        rj.OPTConfig(vocab_size=16, hidden_size=8, num_hidden_layers=0, ffn_dim=8, num_attention_heads=2,
                     max_position_embeddings=8)


@pytest.mark.parametrize("kind", ["opt_sharded", "vit"])
def test_streaming_equals_in_memory(tmp_path, kind, tiny_vit_cls_dir):
    from conftest import make_opt
    from radial_jax.profiling.streaming import profile_streaming
    if kind == "vit":
        path = tiny_vit_cls_dir
        data = [np.random.default_rng(8).normal(size=(2, 3, 16, 16)).astype(np.float32)]
    else:  # post-LN + projection, saved in several shards: one layer is read at a time
        make_opt(tmp_path / "full", seed=9, do_layer_norm_before=False, word_embed_proj_dim=16).save_pretrained(
            tmp_path / "ckpt", max_shard_size="20KB")
        path = tmp_path / "ckpt"
        ids = np.random.default_rng(9).integers(3, 96, (3, 10))
        mask = np.ones_like(ids, bool)
        mask[2, 4:] = False
        data = [(ids[:2], mask[:2]), (ids[2:], mask[2:])]
    a = rj.profile(rj.load(path), data, keep_raw=True, progress=False)
    b = profile_streaming(path, data, keep_raw=True, progress=False)
    assert a.tokens == b.tokens and a.num_params == b.num_params
    for key in a.raw:
        np.testing.assert_allclose(b.raw[key], a.raw[key], atol=1e-5, rtol=1e-5)


def test_profile_on_8_devices_equals_1(tiny_opt_dir):
    """Sharded mode: parameters sharded by the axis rules and the batch split over a 2x2x2 mesh."""
    import os
    import subprocess
    import sys
    import textwrap
    script = textwrap.dedent(f"""
        import numpy as np, jax, radial_jax as rj
        from radial_jax.scale import sharding as S
        assert jax.device_count() == 8
        model = rj.load({str(tiny_opt_dir)!r})
        ids = np.random.default_rng(10).integers(3, 96, (8, 12))
        one = rj.profile(model, [(ids, None)], keep_raw=True, progress=False)
        mesh = S.make_mesh(data=2, fsdp=2, tensor=2)
        model.params = S.shard_params(model.params, S.logical_specs(model.module, ids), mesh)
        sharded_ids = jax.device_put(ids, S.batch_sharding(mesh, 2))
        eight = rj.profile(model, [(sharded_ids, None)], keep_raw=True, progress=False)
        print("MAXDIFF", max(float(np.abs(one.raw[k] - eight.raw[k]).max()) for k in one.raw))
    """)
    env = {**os.environ, "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=8"), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert float(out.stdout.split("MAXDIFF ")[1].split()[0]) < 1e-5


def test_scaling_run_resumes_and_fits(tiny_opt_variants, tmp_path, capsys):
    from radial_jax.profiling.scaling import fit_trend, run_scaling
    ids = np.random.default_rng(11).integers(3, 96, (4, 12))
    make = lambda model: ([(ids, None)], [(ids, None)])
    models = [str(tiny_opt_variants["pre_ln"]), str(tiny_opt_variants["post_ln_projection"])]
    rows = run_scaling(models[:1], make, tmp_path, thresholds=[0.0, 0.2])  # "interrupted" after one model
    assert len(rows) == 1 and (tmp_path / "scaling.png").exists()
    rows = run_scaling(models, make, tmp_path, thresholds=[0.0, 0.2])
    assert "[skip]" in capsys.readouterr().out and len(rows) == 2
    summary = json.loads((tmp_path / "results.json").read_text())
    x = np.array([r["num_params"] for r in rows], float)
    y = np.array([r["median_ratio_out"] for r in rows])
    b = (y[1] - y[0]) / (np.log10(x[1]) - np.log10(x[0]))  # two points: the line through them
    assert summary["trend"]["b"] == pytest.approx(b) and fit_trend(x, y)[1] == pytest.approx(b)
    assert (tmp_path / "results.csv").read_text().count("\n") == 3


def test_layer_axes_have_integer_ticks(tmp_path):
    """Per-layer plots put ticks on whole layers only (MaxNLocator(integer=True)), even for 3 layers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from radial_jax.reporting.files import integer_ticks
    fig, ax = plt.subplots()
    ax.plot([0, 1, 2], [1.0, 2.0, 3.0])
    integer_ticks(ax.xaxis)
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticks() if 0 <= t <= 2]
    assert ticks and all(float(t).is_integer() for t in ticks)
    plt.close(fig)
