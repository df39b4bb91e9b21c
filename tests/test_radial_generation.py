"""``RadialModel.generate``: the one generation path, served the way it is trained.

References: each row's own parallel forward (training == serving, also when the
budget drops visits), the same row in other batches (rows are independent),
greedy decoding (top-k 1), and a router that exits everyone (loops stop early).
"""
import numpy as np
import pytest
import jax

import radial_jax as rj
from radial_jax.radial import RadialModel
from radial_jax.radial.router import exit_index
from radial_jax.serving.speed import decode_program, prefill_program, timed_decode

SMALL = rj.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, ffn_dim=64, num_attention_heads=4,
                     max_position_embeddings=48)
LENGTHS = [7, 3, 1, 5]
NEW = 6
ROUTED = {
    "ordered-propagate": dict(mode="ordered", cache_policy="propagate", capacity_factor=0.5),
    "radial-mask": dict(mode="radial", max_steps=4, capacity_factor=1.2),
}


@pytest.fixture(scope="module")
def small():
    return rj.build(SMALL, seed=3)


@pytest.fixture(scope="module", params=sorted(ROUTED))
def routed(request, small):
    return RadialModel.from_sequential(small, router_init_scale=1.5, seed=1, prefill_buckets=2,
                                         **ROUTED[request.param])


def pad_left(rows):
    """Token rows of different lengths as one left-padded batch ``(ids, mask)``."""
    t = max(len(r) for r in rows)
    ids, mask = np.full((len(rows), t), 1, np.int64), np.zeros((len(rows), t), np.int64)
    for i, r in enumerate(rows):
        ids[i, t - len(r):], mask[i, t - len(r):] = r, 1
    return ids, mask


def random_rows(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, SMALL.vocab_size, n) for n in lengths]


def left_padded(lengths, seed=0):
    return pad_left(random_rows(lengths, seed))


def test_batch_generation_equals_each_rows_parallel_forward_alone(routed):
    ids, mask = left_padded(LENGTHS)
    out = routed.generate(ids, mask, max_new_tokens=NEW, eos_token_id=(), output_logits=True)
    dropped = 0
    for r, n in enumerate(LENGTHS):
        seq = np.concatenate([ids[r, -n:], out.new_tokens[r]])[None]
        alone = routed.forward(seq[:, :-1])  # the row alone, every generated token but the last fed
        np.testing.assert_allclose(out.logits[r], np.asarray(alone.logits)[0, n - 1:], atol=1e-4, rtol=0)
        np.testing.assert_array_equal(out.depth[r], np.asarray(alone.metrics.depth)[0, n - 1:])
        dropped += int(alone.metrics.dropped.sum())
    assert dropped > 0, "the budget must bind for this test to mean anything"
    assert len(np.unique(out.new_tokens)) > 2


def assert_teacher_forcing_reproduces_generate(model):
    prompts = np.random.default_rng(4).integers(3, SMALL.vocab_size, (3, 5))
    out = model.generate(prompts, max_new_tokens=NEW, eos_token_id=(), return_output=True)
    rec = jax.device_get(timed_decode(model, prompts, out.new_tokens[:, :NEW - 1], max_len=5 + NEW)())  # as generate
    np.testing.assert_array_equal(rec["token"].T, out.new_tokens[:, 1:])
    np.testing.assert_array_equal(rec["depth"].T, out.depth[:, 1:])
    np.testing.assert_allclose(rec["flops"], out.step_flops[1:], rtol=1e-6)
    return out


def test_teacher_forcing_with_generates_own_tokens_reproduces_its_tokens_depth_and_flops(routed):
    """The one decode loop in its two uses: fed what ``generate`` chose, the teacher-forced steps (serving
    benchmarks) pick the same next tokens at the same depth and executed FLOPs, with the budget binding."""
    out = assert_teacher_forcing_reproduces_generate(routed)
    assert (out.depth < SMALL.num_layers).any(), "some tokens must skip layers"


def test_teacher_forcing_of_the_sequential_model_reproduces_generate(small):
    assert_teacher_forcing_reproduces_generate(small)


def assert_first_rows_of_a_larger_prefill_decode_as_their_own(model, record=("depth", "flops")):
    """``serving_speed`` decodes a smaller batch from the first rows of the largest batch's prefill: those rows
    must decode as after a prefill of their own (same tokens, depth and FLOPs)."""
    rng = np.random.default_rng(7)
    prompts, feed = rng.integers(3, SMALL.vocab_size, (4, 6)), rng.integers(3, SMALL.vocab_size, (4, NEW))
    served = model.with_layout("per_layer")
    _, cache = prefill_program(served, 4, 6 + NEW)(served.params, prompts)
    rows = served.decoding().first_rows(cache, 2)
    loop = decode_program(served, 2, 6, NEW, record=record)
    from_rows = jax.device_get(loop(served.params, rows, np.asarray(feed[:2], np.int32)))
    own = jax.device_get(timed_decode(served, prompts[:2], feed[:2], record=record)())
    for key in ("token", "depth", "flops"):
        np.testing.assert_allclose(from_rows[key], own[key], rtol=1e-6, err_msg=key)
    return own


def test_the_first_rows_of_a_larger_prefill_decode_as_after_their_own_prefill(routed):
    tight = routed.replace(capacity_factor=0.5)  # a budget that binds in the decode steps too
    own = assert_first_rows_of_a_larger_prefill_decode_as_their_own(tight, record=("depth", "flops", "metrics"))
    assert (own["depth"] < SMALL.num_layers).any(), "some tokens must skip layers"
    assert own["metrics"].dropped.sum() > 0, "the budget must bind for the rows' own counters to matter"


def test_the_first_rows_of_a_sequential_prefill_decode_as_after_their_own_prefill(small):
    assert_first_rows_of_a_larger_prefill_decode_as_their_own(small)


def test_a_row_gives_the_same_tokens_alone_and_in_two_other_batches(routed):
    rows = random_rows(LENGTHS)
    row = rows[0]
    alone = routed.generate(row[None], max_new_tokens=NEW, eos_token_id=())[0, -NEW:]
    for batch, at in ((rows, 0), (random_rows([2, 6, 4], seed=5) + [row], 3)):
        ids, mask = pad_left(batch)
        got = routed.generate(ids, mask, max_new_tokens=NEW, eos_token_id=())[at, -NEW:]
        np.testing.assert_array_equal(got, alone)


def test_end_of_sequence_stops_rows_and_sampling_is_reproducible(routed):
    ids, mask = left_padded(LENGTHS)
    free = routed.generate(ids, mask, max_new_tokens=NEW, eos_token_id=())[:, -NEW:]
    counts = {int(t): sum(t in row[:-1] for row in free) for t in np.unique(free[:, :-1])}
    eos = next((t for t, c in counts.items() if 0 < c < len(LENGTHS)), None)
    if eos is None:
        pytest.skip("no token that only some rows produce")  # not reached with these seeds
    out = routed.generate(ids, mask, max_new_tokens=NEW, eos_token_id=eos, return_output=True)
    for r in range(len(LENGTHS)):
        hits = np.flatnonzero(free[r] == eos)
        if hits.size:
            stop = hits[0] + 1
            np.testing.assert_array_equal(out.new_tokens[r, :stop], free[r, :stop])
            assert (out.new_tokens[r, stop:] == SMALL.pad_token_id).all() and out.finished[r]
            assert out.num_new[r] == stop and (out.depth[r, stop:] == 0).all()
        else:
            np.testing.assert_array_equal(out.new_tokens[r], free[r])
    key = jax.random.key(7)
    a = routed.generate(ids, mask, max_new_tokens=NEW, do_sample=True, rng=key, temperature=0.7, top_p=0.9)
    b = routed.generate(ids, mask, max_new_tokens=NEW, do_sample=True, rng=key, temperature=0.7, top_p=0.9)
    np.testing.assert_array_equal(a, b)
    greedy = routed.generate(ids, mask, max_new_tokens=NEW)
    top1 = routed.generate(ids, mask, max_new_tokens=NEW, do_sample=True, rng=jax.random.key(3), top_k=1)
    np.testing.assert_array_equal(top1, greedy)


def test_identity_routing_generates_what_the_sequential_model_generates(small):
    ids, mask = left_padded(LENGTHS, seed=2)
    rm = RadialModel.from_sequential(small, mode="ordered", routing="identity")
    out = rm.generate(ids, mask, max_new_tokens=NEW, eos_token_id=(), return_output=True)
    ref = small.generate(ids, mask, max_new_tokens=NEW, eos_token_id=(), return_output=True)
    np.testing.assert_array_equal(out.sequences, ref.sequences)
    assert (out.depth == SMALL.num_layers).all()
    # identity routing runs what the sequential model runs, plus the router
    assert (out.step_flops[1:] >= ref.step_flops[1:]).all()


def test_when_every_row_exits_at_once_decoding_runs_one_step_and_less_compute(small):
    rm = RadialModel.from_sequential(small, mode="radial", max_steps=4, router_init_scale=1.5, seed=1)
    router = dict(rm.params["router"])
    router["step_bias"] = router["step_bias"].at[:, exit_index(SMALL.num_layers)].set(1e4)  # everyone exits
    gone = rm.replace(params={**rm.params, "router": router})
    ids = np.random.default_rng(4).integers(3, 64, (3, 5))
    cache = gone.forward(ids, positions_bt=np.broadcast_to(np.arange(5), (3, 5)), max_len=8).cache
    step = gone.decode_step(ids[:, -1], np.full(3, 5), cache)
    assert int(step.metrics.steps_run) == 1 < gone.radial.steps(SMALL.num_layers)
    assert int(step.metrics.depth.sum()) == 0 and int(step.metrics.exits.sum()) == 3
    busy = rm.decode_step(ids[:, -1], np.full(3, 5), rm.forward(
        ids, positions_bt=np.broadcast_to(np.arange(5), (3, 5)), max_len=8).cache)
    assert float(step.metrics.executed_flops) < float(busy.metrics.executed_flops)
