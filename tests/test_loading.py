"""Loading: sharded safetensors, bf16, pytorch_model.bin, the hub cache offline, and every loading error."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForCausalLM

import radial_jax as rj
from conftest import make_opt

IDS = np.array([[5, 9, 17, 33, 2, 40], [7, 7, 8, 60, 61, 3]])


def reference_logits(path, dtype=torch.float32):
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    with torch.no_grad():
        return ref(input_ids=torch.tensor(IDS)).logits.float().numpy()


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_sharded_safetensors(tmp_path):
    ref = make_opt(tmp_path / "full", seed=3)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    np.testing.assert_allclose(np.asarray(rj.load(tmp_path / "sharded")(IDS)), reference_logits(tmp_path / "full"),
                               atol=1e-4, rtol=0)


def test_missing_shard_is_named(tmp_path):
    ref = make_opt(tmp_path / "full", seed=3)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    victim = sorted((tmp_path / "sharded").glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(rj.CheckpointError, match=victim.name):
        rj.load(tmp_path / "sharded")


@pytest.mark.parametrize("torch_dtype,ours", [(torch.bfloat16, "bfloat16"), (torch.float16, "float16")])
def test_half_precision_checkpoints(tmp_path, torch_dtype, ours):
    model = make_opt(tmp_path / "fp32", seed=4)
    model.to(torch_dtype).save_pretrained(tmp_path / "half")
    header_len = int.from_bytes((tmp_path / "half" / "model.safetensors").read_bytes()[:8], "little")
    header = json.loads((tmp_path / "half" / "model.safetensors").read_bytes()[8:8 + header_len])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16" if ours == "bfloat16" else "F16"}
    # Loaded in fp32, the half-precision weights give what transformers computes from them in fp32.
    expected = reference_logits(tmp_path / "half", dtype=torch.float32)
    np.testing.assert_allclose(np.asarray(rj.load(tmp_path / "half")(IDS)), expected, atol=1e-4, rtol=0)
    # Loaded in its own dtype, params keep it and the logits stay close.
    half = rj.load(tmp_path / "half", dtype=ours)
    assert {str(p.dtype) for p in __import__("jax").tree_util.tree_leaves(half.params)} == {ours}
    np.testing.assert_allclose(np.asarray(half(IDS)), expected, atol=0.1, rtol=0)


def save_bin_checkpoint(model, directory):
    """An old-style checkpoint: config.json + pytorch_model.bin (transformers 5 only writes safetensors)."""
    directory.mkdir()
    model.config.save_pretrained(directory)
    torch.save(model.state_dict(), directory / "pytorch_model.bin")


def test_pytorch_bin_loads_with_torch(tmp_path):
    model = make_opt(tmp_path / "st", seed=5)
    save_bin_checkpoint(model, tmp_path / "bin")
    assert not list((tmp_path / "bin").glob("*.safetensors"))
    np.testing.assert_allclose(np.asarray(rj.load(tmp_path / "bin")(IDS)), reference_logits(tmp_path / "st"),
                               atol=1e-4, rtol=0)


def test_pytorch_bin_without_torch_says_how(tmp_path, monkeypatch):
    save_bin_checkpoint(make_opt(tmp_path / "st", seed=5), tmp_path / "bin")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now fails
    with pytest.raises(rj.CheckpointError, match=r"radial_jax\[torch\]"):
        rj.load(tmp_path / "bin")


def _rewrite_weights(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(tiny_opt_dir, tmp_path):
    path = copy_checkpoint(tiny_opt_dir, tmp_path / "c")
    name = "model.decoder.layers.1.fc2.bias"
    _rewrite_weights(path, lambda t: t.pop(name))
    with pytest.raises(rj.CheckpointError, match="missing tensor 'decoder.layers.1.fc2.bias'"):
        rj.load(path)


def test_unexpected_tensor_is_named(tiny_opt_dir, tmp_path):
    path = copy_checkpoint(tiny_opt_dir, tmp_path / "c")
    _rewrite_weights(path, lambda t: t.update({"model.decoder.layers.7.fc1.weight": np.zeros((2, 2), np.float32)}))
    with pytest.raises(rj.CheckpointError, match="unexpected tensors.*decoder.layers.7.fc1.weight"):
        rj.load(path)


def test_misshaped_tensor_is_named(tiny_opt_dir, tmp_path):
    path = copy_checkpoint(tiny_opt_dir, tmp_path / "c")
    name = "model.decoder.layers.0.fc1.weight"
    _rewrite_weights(path, lambda t: t.update({name: t[name][:, :-1].copy()}))
    with pytest.raises(rj.CheckpointError, match=r"'decoder.layers.0.fc1.weight' has shape \(31, 64\)"):
        rj.load(path)


def test_unknown_model_type(tiny_opt_dir, tmp_path):
    path = copy_checkpoint(tiny_opt_dir, tmp_path / "c")
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "mamba"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'mamba' is not supported; supported: \[.*'llama'.*'opt'.*\]"):
        rj.load(path)


def test_bad_paths_and_dtype(tiny_opt_dir, tmp_path):
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"):
        rj.load(tiny_opt_dir, dtype="int8")
    with pytest.raises(rj.CheckpointError, match="no checkpoint directory"):
        rj.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(rj.CheckpointError, match="no config.json"):
        rj.load(tmp_path / "empty")
    shutil.copy(tiny_opt_dir / "config.json", tmp_path / "empty" / "config.json")
    with pytest.raises(rj.CheckpointError, match="has no weights"):
        rj.load(tmp_path / "empty")


def test_bad_inputs(tiny_opt_dir, tiny_vit_cls_dir):
    opt = rj.load(tiny_opt_dir)
    with pytest.raises(ValueError, match="empty"):
        opt(np.zeros((0, 4), np.int32))
    with pytest.raises(ValueError, match="exceeds the model's 48 positions"):
        opt(np.zeros((1, 49), np.int32))
    with pytest.raises(ValueError, match="2-D"):
        opt(np.zeros((4,), np.int32))
    vit = rj.load(tiny_vit_cls_dir)
    with pytest.raises(ValueError, match=r"\[batch>=1, 3, 16, 16\].*got \(1, 3, 32, 32\)"):
        vit(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match=r"got \(1, 1, 16, 16\)"):
        vit(np.zeros((1, 1, 16, 16), np.float32))
    with pytest.raises(ValueError, match=r"got \(0, 3, 16, 16\)"):
        vit(np.zeros((0, 3, 16, 16), np.float32))


def test_hub_id_resolves_from_cache_offline(tiny_opt_dir, tmp_path):
    """A hub id is served from huggingface_hub's cache with HF_HUB_OFFLINE=1; a miss is a clear error."""
    snapshot = tmp_path / "hub" / "models--tiny-org--tiny-opt" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_opt_dir, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    script = textwrap.dedent("""
        import numpy as np, radial_jax as rj
        m = rj.load("tiny-org/tiny-opt")
        print("LOGITS", float(np.asarray(m(np.array([[5, 6, 7]]))).sum()))
        try:
            rj.load("tiny-org/not-cached")
        except rj.CheckpointError as e:
            print("ERROR", "HF_HUB_OFFLINE" in str(e))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    direct = float(np.asarray(rj.load(tiny_opt_dir)(np.array([[5, 6, 7]]))).sum())
    got = float(out.stdout.split("LOGITS ")[1].split()[0])
    assert got == pytest.approx(direct, rel=1e-6)
    assert "ERROR True" in out.stdout


def test_hub_download_fetches_the_shards_the_index_names_and_not_a_consolidated_copy(tmp_path, monkeypatch):
    """A repository holding both shards and a consolidated ``model.safetensors`` of the same weights: only the
    metadata and the index's shards are fetched (``snapshot_download`` stands in for the hub, copying the
    repository's files that match the requested patterns)."""
    import fnmatch
    import huggingface_hub
    repo = tmp_path / "repo"
    make_opt(tmp_path / "full", seed=3).save_pretrained(repo, max_shard_size="20KB")
    shutil.copy(tmp_path / "full" / "model.safetensors", repo / "model.safetensors")  # the duplicate
    (repo / "pytorch_model.bin").write_bytes(b"not wanted")
    cache, requests = tmp_path / "cache", []

    def fake_snapshot_download(repo_id, allow_patterns):
        requests.append(list(allow_patterns))
        for f in repo.iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                cache.mkdir(exist_ok=True)
                shutil.copy(f, cache / f.name)
        return str(cache)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = rj.load("someone/sharded-opt")
    shards = sorted(json.loads((repo / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert sorted(p.name for p in cache.glob("*.safetensors")) == sorted(set(shards))  # no model.safetensors
    assert not (cache / "pytorch_model.bin").exists() and len(requests) == 2
    np.testing.assert_allclose(np.asarray(model(IDS)), reference_logits(tmp_path / "full"), atol=1e-4, rtol=0)


def test_a_model_trained_here_loads_on_a_mesh_with_the_logits_it_has_off_it(tmp_path):
    """``rj.load(dir, mesh=...)`` of a ``radial-jax train`` folder (``params.msgpack``): the distill command's
    teacher on a mesh; it used to be refused, and a copy of this loading lived in the CLI."""
    from radial_jax.checkpoints.artifacts import save_model
    from radial_jax.models.sharded import ShardedModel
    from radial_jax.scale.sharding import make_mesh
    model = rj.build(rj.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                  num_attention_heads=2, max_position_embeddings=32), seed=2)
    save_model(model, tmp_path / "trained")
    ids = np.random.default_rng(0).integers(3, 64, (2, 9))
    plain = rj.load(str(tmp_path / "trained"))
    placed = rj.load(str(tmp_path / "trained"), mesh=make_mesh(1, 1, 1))
    assert isinstance(placed, ShardedModel) and placed.tokenizer_path == plain.tokenizer_path
    np.testing.assert_allclose(np.asarray(placed(ids)), np.asarray(plain(ids)), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="gguf_file= applies to Hugging Face checkpoints"):
        rj.load(str(tmp_path / "trained"), gguf_file="x.gguf")
