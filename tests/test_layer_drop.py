"""Static layer drop and block influence against transformers with the layers removed (PyTorch), and the
paired bootstrap against a plain resampling loop."""
import copy

import numpy as np
import pytest
import torch
import transformers

import radial_jax as rj
from conftest import perturb_
from radial_jax.profiling.layer_drop import block_influence, drop_layers, least_influential, route_layers
from radial_jax.models.perplexity import perplexity
from radial_jax.training.paired import paired_bootstrap, window_nll

transformers.logging.set_verbosity_error()
# Gemma 3: local and global layers with their own RoPE (one global every third layer), so dropping a layer
# must keep each remaining layer's own kind
GEMMA3 = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, sliding_window=4, max_position_embeddings=64, query_pre_attn_scalar=24,
              rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=2, eos_token_id=1, num_hidden_layers=6,
              sliding_window_pattern=3,
              rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 20000.0},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 300.0}})


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    torch.manual_seed(0)
    ref = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**GEMMA3)).eval()
    perturb_(ref, seed=1, scale=0.3)
    path = tmp_path_factory.mktemp("gemma3")
    ref.save_pretrained(path)
    return ref, rj.load(str(path))


def _without(ref, drop):
    """transformers' model with ``drop`` removed from its layer list, written independently of ours."""
    short = copy.deepcopy(ref)
    keep = [i for i in range(len(short.model.layers)) if i not in drop]
    short.model.layers = torch.nn.ModuleList(short.model.layers[i] for i in keep)
    short.config.layer_types = [short.config.layer_types[i] for i in keep]
    short.config.num_hidden_layers = len(keep)
    for j, layer in enumerate(short.model.layers):
        layer.self_attn.layer_idx = j
    return short


@pytest.mark.parametrize("drop", [[2], [0, 5], [1, 2, 4]])
def test_dropped_model_computes_what_transformers_computes_without_those_layers(gemma, drop):
    ref, ours = gemma
    ids = np.random.default_rng(0).integers(3, 96, (2, 11))
    short = drop_layers(ours, drop)
    assert short.config.num_layers == 6 - len(drop)
    assert short.config.layer_types == tuple(t for i, t in enumerate(ours.config.layer_types) if i not in drop)
    with torch.no_grad():
        want = _without(ref, drop)(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(short(ids)), want, atol=1e-4, rtol=1e-4)
    per_layer = drop_layers(ours.with_layout("per_layer"), drop)  # the inference layout drops the same layers
    np.testing.assert_allclose(np.asarray(per_layer(ids)), want, atol=1e-4, rtol=1e-4)


def _through(ref, route):
    """transformers' model running its layers in ``route``'s order, a repeated layer as a copy of its module."""
    routed = copy.deepcopy(ref)
    routed.model.layers = torch.nn.ModuleList(copy.deepcopy(ref.model.layers[i]) for i in route)
    routed.config.layer_types = [ref.config.layer_types[i] for i in route]
    routed.config.num_hidden_layers = len(route)
    for j, layer in enumerate(routed.model.layers):
        layer.self_attn.layer_idx = j
    return routed


@pytest.mark.parametrize("route", [[0, 1, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [2, 2, 2], [0, 2, 0, 2]])
def test_a_static_route_with_reused_layers_computes_what_transformers_computes_through_them(gemma, route):
    ref, ours = gemma
    ids = np.random.default_rng(3).integers(3, 96, (2, 10))
    routed = route_layers(ours, route)
    assert routed.config.num_layers == len(route)
    assert routed.config.layer_types == tuple(ours.config.layer_types[i] for i in route)  # a layer keeps its kind
    with torch.no_grad():
        want = _through(ref, route)(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(routed(ids)), want, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(route_layers(ours.with_layout("per_layer"), route)(ids)), want,
                               atol=1e-4, rtol=1e-4)
    for bad in ([], [6], [0, -1]):
        with pytest.raises(ValueError, match=r"non-empty sequence of layer indices in \[0, 6\)"):
            route_layers(ours, bad)


def test_block_influence_is_one_minus_the_cosine_of_layer_input_and_output(gemma):
    ref, ours = gemma
    ids = np.random.default_rng(1).integers(3, 96, (3, 9))
    mask = np.ones_like(ids, bool)
    mask[1, :4] = False  # left padding does not count
    ids[1, :4] = 0
    pairs = []
    hooks = [layer.register_forward_hook(lambda m, a, kw, o: pairs.append((kw["hidden_states"] if "hidden_states" in kw
                                                                           else a[0], o[0] if isinstance(o, tuple)
                                                                           else o)), with_kwargs=True)
             for layer in ref.model.layers]
    with torch.no_grad():
        ref(torch.tensor(ids), attention_mask=torch.tensor(mask.astype(int)))
    for h in hooks:
        h.remove()
    want = np.array([1 - torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1).numpy()[mask].mean()
                     for x, y in pairs])
    got = block_influence(ours, [(ids, mask)])
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-6)
    assert least_influential(got, 2) == tuple(sorted(np.argsort(want)[:2]))


def test_drop_layers_refuses_what_is_not_a_layer_set(gemma):
    _, ours = gemma
    for bad in ([6], [-1], list(range(6))):
        with pytest.raises(ValueError, match=r"distinct indices in \[0, 6\) leaving at least one"):
            drop_layers(ours, bad)
    with pytest.raises(ValueError, match="can drop 0 to 5 of 6 layers"):
        least_influential(np.arange(6.0), 6)


def test_window_nll_sums_what_transformers_loss_averages(gemma):
    ref, ours = gemma
    windows = np.random.default_rng(2).integers(3, 96, (5, 8))
    nll, scored = window_nll(ours, windows, batch_size=2)
    with torch.no_grad():
        want = [float(ref(torch.tensor(w[None]), labels=torch.tensor(w[None])).loss) * (len(w) - 1) for w in windows]
    np.testing.assert_allclose(nll, want, rtol=1e-4)
    assert scored.tolist() == [7] * 5
    assert perplexity(nll.sum(), scored.sum()) == pytest.approx(np.exp(np.sum(want) / 35), rel=1e-5)


def test_paired_bootstrap_against_a_plain_resampling_loop():
    rng = np.random.default_rng(0)
    scored = np.full(40, 100.0)
    base = rng.uniform(200, 400, 40)
    other = base + rng.normal(5, 20, 40)  # worse on average, noisily
    got = paired_bootstrap((base, scored), (other, scored), reps=500, seed=3)
    draws = np.random.default_rng(3).integers(0, 40, size=(500, 40))
    ratios = []
    for row in draws:
        ratios.append(np.exp(sum(other[i] - base[i] for i in row) / sum(scored[i] for i in row)))
    assert got["ratio"] == pytest.approx(np.exp((other.sum() - base.sum()) / 4000))
    assert got["low"] == pytest.approx(np.percentile(ratios, 2.5), rel=1e-6)  # exp and interpolation commute to ~1e-8
    assert got["high"] == pytest.approx(np.percentile(ratios, 97.5), rel=1e-6)
    assert got["p_other_better"] == pytest.approx(np.mean(np.array(ratios) < 1))
    # a constant shift of d nats per token is a ratio of exactly exp(d), whatever the resample
    shifted = paired_bootstrap((base, scored), (base + 100 * 0.1, scored), reps=200)
    assert shifted["low"] == pytest.approx(np.exp(0.1)) and shifted["high"] == pytest.approx(np.exp(0.1))
    with pytest.raises(ValueError, match="paired windows differ"):
        paired_bootstrap((base, scored), (other[:-1], scored[:-1]))
