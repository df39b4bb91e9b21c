"""Data sources: offline corpus and tokenizer, perplexity windows, WikiText-2 from local hub-layout parquet,
image folders; and the profile/simulate commands on the offline default with HF_HUB_OFFLINE=1."""
import json
import re

import numpy as np
import pytest

from radial_jax.data import (embedded_corpus, image_folder, offline_tokenizer, perplexity_windows, read_text_files,
                             wikitext2)


def test_offline_tokenizer_round_trips_and_is_deterministic(tmp_path, monkeypatch):
    tok = offline_tokenizer()
    text = embedded_corpus()[3][:500]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and len(ids) < len(text) / 2  # BPE merges happened
    assert (tok.pad_token_id, tok.eos_token_id) == (1, 2)
    monkeypatch.setattr("radial_jax.data.corpus.CACHE_DIR", tmp_path)  # train again from scratch
    assert offline_tokenizer()(text, add_special_tokens=False)["input_ids"] == ids


def test_perplexity_windows_score_every_token_once():
    tokens = np.arange(3, 103)
    for window, stride in ((16, 16), (16, 8), (16, 5), (7, 1)):
        ids, mask, score = perplexity_windows(tokens, window, stride)
        scored = []
        for row in range(len(ids)):
            assert not score[row, 0]
            scored.extend(ids[row][score[row] & mask[row]])
        if stride < window:  # overlap gives every token (but the very first) a context
            assert sorted(scored) == list(tokens[1:])
        else:  # disjoint windows: the first token of each window has no context
            assert sorted(scored) == sorted(set(tokens) - set(tokens[::window]))
    with pytest.raises(ValueError, match="stride"):
        perplexity_windows(tokens, 8, 9)
    with pytest.raises(ValueError, match="at least 2"):
        perplexity_windows(tokens[:1], 8)


def test_wikitext2_from_local_hub_layout(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "wikitext-2-raw-v1").mkdir()
    lines = ["", " = Title = \n", "Some text .\n"]
    pq.write_table(pa.table({"text": lines}), tmp_path / "wikitext-2-raw-v1" / "test-00000-of-00001.parquet")
    assert wikitext2("test", repo_dir=tmp_path) == ["".join(lines)]
    with pytest.raises(ValueError, match="split 'dev' is unknown"):
        wikitext2("dev", repo_dir=tmp_path)
    with pytest.raises(ValueError, match="no WikiText-2 parquet"):
        wikitext2("train", repo_dir=tmp_path)


def test_text_files_and_images(tmp_path):
    from PIL import Image
    with pytest.raises(ValueError, match="no text"):
        read_text_files(tmp_path / "none")
    (tmp_path / "a.txt").write_text("hello")
    assert read_text_files(tmp_path) == ["hello"]
    img = np.zeros((20, 30, 3), np.uint8)
    img[..., 0] = 255
    Image.fromarray(img).save(tmp_path / "red.png")
    (batch,) = list(image_folder(tmp_path, 8))
    assert batch.shape == (1, 3, 8, 8)
    np.testing.assert_allclose(batch[0, 0], 1.0)  # (1 - 0.5) / 0.5
    np.testing.assert_allclose(batch[0, 1], -1.0)
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot decode image .*broken.jpg"):
        list(image_folder(tmp_path, 8))


def test_profile_and_simulate_commands_offline(tmp_path, monkeypatch, capsys):
    """The offline default path: embedded corpus + offline tokenizer + a local checkpoint, no network."""
    from conftest import make_opt
    from radial_jax.cli import main
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    make_opt(tmp_path / "ckpt", seed=7, vocab_size=offline_tokenizer().vocab_size, max_position_embeddings=64)
    common = ["--model", str(tmp_path / "ckpt"), "--data", "embedded", "--window", "32", "--max-tokens", "600"]
    capsys.readouterr()
    assert main(["profile", *common, "--out", str(tmp_path / "p")]) == 2  # no tokenizer: refused, none substituted
    assert re.fullmatch(r"radial-jax profile: error: .*holds no tokenizer.*\n", capsys.readouterr().err)
    assert not (tmp_path / "p").exists()
    offline_tokenizer().save_pretrained(tmp_path / "ckpt")  # the checkpoint's own tokenizer
    assert main(["profile", *common, "--out", str(tmp_path / "p")]) == 0
    prof = json.loads((tmp_path / "p" / "profile.json").read_text())
    assert prof["data"] == "embedded" and prof["model"] == str(tmp_path / "ckpt") and prof["tokens"] == 600
    assert main(["profile", *common, "--streaming", "--out", str(tmp_path / "ps")]) == 0
    streamed = json.loads((tmp_path / "ps" / "profile.json").read_text())
    assert streamed["median_ratio_out"] == pytest.approx(prof["median_ratio_out"], rel=1e-5)
    assert main(["simulate", *common, "--thresholds", "0,0.5", "--out", str(tmp_path / "s")]) == 0
    sim = json.loads((tmp_path / "s" / "simulation.json").read_text())
    assert [r["threshold"] for r in sim["thresholds"]] == [0.0, 0.5]
    capsys.readouterr()
    assert main(["simulate", *common, "--thresholds", "-0.1"]) == 2  # a clean one-line error, no traceback
    assert re.fullmatch(r"radial-jax simulate: error: .*in \[0, 1\].*\n", capsys.readouterr().err)
    assert main(["profile", *common[:-2], "--max-tokens", "10"]) == 2
    assert "radial-jax profile: error:" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the stdlib source


def test_stdlib_split_is_by_document_name_and_holds_out_about_five_percent():
    import hashlib
    from radial_jax.data.stdlib import is_held_out, stdlib_documents, stdlib_split
    docs = stdlib_documents()
    names = [n for n, _ in docs]
    assert names == sorted(names) and len(set(names)) == len(names)
    assert any(n.startswith("topic/") for n in names) and "source/json/decoder.py" in names
    assert not any("/test/" in n or "/tests/" in n or "site-packages" in n for n in names)
    # the rule, written another way: the SHA-1's first 16 hex digits as a fraction of 16 ** 16
    expected = [int(hashlib.sha1(n.encode()).hexdigest()[:16], 16) / 16 ** 16 < 0.05 for n in names]
    assert [is_held_out(n, 0.05) for n in names] == expected
    train, held = stdlib_split(0.05)
    by_name = dict(docs)
    assert held == [by_name[n] for n, e in zip(names, expected) if e]
    assert train == [by_name[n] for n, e in zip(names, expected) if not e]
    assert 0.02 < len(held) / len(docs) < 0.08
    # enough text for the real-model study: about 3.3 characters a Gemma token on this text
    assert sum(map(len, train)) > 4_000_000 and sum(map(len, held)) > 200_000


def test_stdlib_text_is_tokenized_once_per_tokenizer_and_read_only():
    from radial_jax.data.corpus import offline_tokenizer, tokenize
    from radial_jax.data.packed import text_data
    from radial_jax.data.stdlib import stdlib_split
    first, again = text_data("stdlib"), text_data("stdlib")
    assert again.train is first.train and again.eval is first.eval  # the cached streams, not a second pass
    with pytest.raises(ValueError, match="read-only"):
        first.train[0] = 0
    held = tokenize(stdlib_split()[1], offline_tokenizer())  # what the cache holds, computed again
    np.testing.assert_array_equal(first.eval, held)
    assert first.windows(16, 4)[0].shape == (4, 16) and first.dataset(16, 2).batch(0).shape == (2, 16)


def test_tokenize_is_each_documents_tokens_then_eos_in_order_across_chunks():
    from radial_jax.data.corpus import tokenize
    tok = offline_tokenizer()
    docs = embedded_corpus()[:7]
    plain = []  # one document at a time, written differently
    for doc in docs:
        plain += tok.encode(doc, add_special_tokens=False) + [tok.eos_token_id]
    np.testing.assert_array_equal(tokenize(docs, tok, chunk=3), np.asarray(plain, np.int32))  # 3 + 3 + 1
    assert tokenize([], tok).shape == (0,)


def test_stdlib_split_refuses_a_fraction_outside_0_1():
    from radial_jax.data.stdlib import stdlib_split
    for bad in (0, 1, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"held_out_fraction must be in \(0, 1\)"):
            stdlib_split(bad)


# ---------------------------------------------------------------------------------------------- tokenizers


def test_a_model_trained_here_records_the_offline_tokenizer_and_gets_it_back(tmp_path):
    import radial_jax as rj
    from radial_jax.checkpoints.artifacts import load_model, save_model
    model = rj.build(rj.OPTConfig(vocab_size=2048, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                  num_attention_heads=2, max_position_embeddings=32))
    model.tokenizer_path = offline_tokenizer(2048).name_or_path
    save_model(model, tmp_path / "m")
    tok = load_model(tmp_path / "m").tokenizer()
    text = "The for statement"
    assert tok(text)["input_ids"] == offline_tokenizer(2048)(text)["input_ids"]


def test_a_model_without_a_tokenizer_is_refused_not_given_another(tmp_path):
    import radial_jax as rj
    from conftest import make_opt
    from radial_jax.checkpoints.tokenizer import load_tokenizer
    make_opt(tmp_path / "ckpt", seed=0, vocab_size=2048, max_position_embeddings=32)
    with pytest.raises(ValueError, match="holds no tokenizer.*tokenizer.json"):
        rj.load(str(tmp_path / "ckpt")).tokenizer()
    with pytest.raises(ValueError, match="has no tokenizer"):
        rj.build(rj.OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                              num_attention_heads=2, max_position_embeddings=32)).tokenizer()
    with pytest.raises(ValueError, match="offline-pydoc-bpe-N"):
        load_tokenizer("offline-pydoc-bpe-big")


def test_windows_open_with_bos_then_cut_the_stream_without_gaps_or_overlaps():
    from radial_jax.data.packed import PackedDataset
    tokens = np.arange(10, 110)  # 100 stream tokens
    ds = PackedDataset(tokens, seq_len=8, batch_size=3, seed=1, bos_token_id=2)
    assert ds.num_windows == 100 // 7
    every = ds.all_windows()
    expected = [[2] + list(range(10 + 7 * i, 17 + 7 * i)) for i in range(100 // 7)]  # BOS + 7 stream tokens
    assert every.tolist() == expected
    seen = np.concatenate([ds.global_batch(p) for p in range(ds.batches_per_epoch)])
    rows = set(map(tuple, seen.tolist()))  # one epoch: distinct windows, each one of the cuts above
    assert len(rows) == len(seen) and rows <= set(map(tuple, expected))
    plain = PackedDataset(tokens, seq_len=8, batch_size=3)  # without BOS: plain cuts of 8, as before
    assert plain.all_windows().tolist() == tokens[:96].reshape(12, 8).tolist()


def test_open_with_bos_needs_a_tokenizer_with_one():
    from radial_jax.data.packed import text_data

    class NoBos:
        bos_token_id = None
    with pytest.raises(ValueError, match="needs a tokenizer with a BOS token"):
        text_data(np.arange(100), tokenizer=NoBos(), open_with_bos=True)


def test_model_text_data_opens_windows_with_bos_for_pretrained_models_only(tmp_path):
    import radial_jax as rj
    from conftest import make_opt
    from radial_jax.data.packed import model_text_data
    text = np.arange(3, 300) % 90 + 3
    make_opt(tmp_path / "ckpt", seed=0, vocab_size=2048, max_position_embeddings=32)
    offline_tokenizer().save_pretrained(tmp_path / "ckpt")  # a checkpoint's own tokenizer, with a BOS
    pretrained = rj.load(str(tmp_path / "ckpt"))
    windows = model_text_data(text, pretrained).windows(8)[0]
    assert (windows[:, 0] == pretrained.tokenizer().bos_token_id).all()
    trained_here = rj.build(pretrained.config)
    trained_here.tokenizer_path = offline_tokenizer().name_or_path  # recorded by a model trained here
    plain = model_text_data(text, trained_here)
    assert plain.bos_token_id is None and plain.windows(8)[0][0].tolist() == plain.eval[:8].tolist()
    with pytest.raises(ValueError, match="has no tokenizer"):
        model_text_data(text, rj.build(pretrained.config))


def test_images_are_normalised_with_the_checkpoints_own_statistics_as_transformers_does(tmp_path):
    """A checkpoint with ImageNet statistics in its preprocessor_config.json: our pixel values equal
    transformers' ViTImageProcessor's on the same image (resize, rescale, normalise)."""
    import json
    from PIL import Image
    from transformers import ViTImageProcessor
    from radial_jax.data.images import ImageStats, preprocess
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (37, 23, 3), dtype=np.uint8))
    cfg = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "size": {"height": 16, "width": 16},
           "do_normalize": True, "do_rescale": True, "rescale_factor": 1 / 255, "resample": 2}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    ours = preprocess([img], 16, ImageStats.of(tmp_path))
    theirs = ViTImageProcessor.from_pretrained(str(tmp_path))(images=[img], return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    assert ImageStats.of(tmp_path / "elsewhere") == ImageStats()  # no file: google/vit-*'s 0.5 and 0.5
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**cfg, "image_std": [0.2, 0.0, 0.2]}))
    with pytest.raises(ValueError, match="image_std"):
        ImageStats.of(tmp_path)
