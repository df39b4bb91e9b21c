"""One table of bad inputs across the API and the CLI: each fails with the right exception type and a
message that names the file or argument and what was expected; nothing half-written is left behind.

Each row: ``(id, make, exception, patterns)``. ``make(env)`` builds the bad input in a fresh
directory and returns a zero-argument callable that must raise; ``{dir}`` in a pattern is that
directory (escaped). CLI rows go through ``radial_jax.cli.main`` and must exit 2 with one
``radial-jax <cmd>: error: ...`` line (raised here as ``CLIError`` for the table).
"""
from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

import radial_jax as rj
from radial_jax import CheckpointError


class CLIError(Exception):
    """A CLI command that exited 2 with one clean error line (its text)."""


class Env:
    """A fresh directory with a copy of a good tiny OPT checkpoint (``ckpt``) and helpers."""

    def __init__(self, root: Path, good: Path, capsys):
        self.dir, self.capsys = root, capsys
        self.ckpt = root / "ckpt"
        shutil.copytree(good, self.ckpt)
        self.weights = self.ckpt / "model.safetensors"

    def cli(self, *argv):
        from radial_jax.cli import main

        def run():
            self.capsys.readouterr()
            rc = main([str(a) for a in argv])
            err = self.capsys.readouterr().err
            assert rc == 2 and err.startswith(f"radial-jax {argv[0]}: error: ") and err.count("\n") == 1, (rc, err)
            raise CLIError(err)
        return run

    def header(self):
        (n,) = struct.unpack("<Q", self.weights.read_bytes()[:8])
        return json.loads(self.weights.read_bytes()[8:8 + n]), n

    def rewrite_header(self, edit):
        """Apply ``edit(header)`` and write the header back, padded to its old length."""
        raw = self.weights.read_bytes()
        header, n = self.header()
        edit(header)
        text = json.dumps(header, separators=(",", ":")).encode()
        assert len(text) <= n
        self.weights.write_bytes(raw[:8] + text.ljust(n) + raw[8 + n:])

    def edit_config(self, **changes):
        cfg = json.loads((self.ckpt / "config.json").read_text())
        cfg.update(changes)
        (self.ckpt / "config.json").write_text(json.dumps(cfg))

    def model(self):
        return rj.load(str(self.ckpt))


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory):
    from conftest import make_opt
    d = tmp_path_factory.mktemp("good") / "ckpt"
    make_opt(d, seed=5)
    return d


# --- builders of bad inputs (each returns the call that must fail) --------------------------------------

def truncated_safetensors(env):
    raw = env.weights.read_bytes()
    env.weights.write_bytes(raw[:len(raw) // 2])
    return env.model


def garbage_safetensors(env):
    env.weights.write_bytes(np.random.default_rng(0).bytes(4096))  # a random "header length" of ~2^63
    return env.model


def tiny_safetensors(env):
    env.weights.write_bytes(b"\x01\x02")
    return env.model


def header_not_json(env):
    env.weights.write_bytes(struct.pack("<Q", 16) + b"{not json at all" + b"\0" * 64)
    return env.model


def unsupported_dtype(env):
    def edit(h):
        name = next(k for k in h if k != "__metadata__")
        h[name]["dtype"] = "C64"
    env.rewrite_header(edit)
    return env.model


def tensor_bytes_outside_file(env):
    def edit(h):
        name = next(k for k in h if k != "__metadata__" and len(h[k]["shape"]) == 2)
        h[name]["shape"] = [int("9" * len(str(d))) for d in h[name]["shape"]]  # same header length, more bytes
    env.rewrite_header(edit)
    return env.model


def malformed_config(env):
    (env.ckpt / "config.json").write_text('{"model_type": "opt", "hidden_size": ')
    return env.model


def config_not_an_object(env):
    (env.ckpt / "config.json").write_text("[1, 2, 3]")
    return env.model


def missing_config(env):
    (env.ckpt / "config.json").unlink()
    return env.model


def unknown_model_type(env):
    env.edit_config(model_type="mamba")
    return env.model


def config_shape_mismatch(env):
    env.edit_config(ffn_dim=48)  # the tensors were written for ffn_dim 64
    return env.model


def config_width_as_text(env):
    env.edit_config(hidden_size="32")  # a config.json written by hand
    return env.model


def config_width_as_text_in_code(env):
    return lambda: rj.OPTConfig(hidden_size="32")


def negative_norm_epsilon(env):
    return lambda: rj.LlamaConfig(rms_norm_eps=-1.0)


def zero_embedding_projection(env):
    return lambda: rj.OPTConfig(word_embed_proj_dim=0)


def no_checkpoint_dir(env):
    return lambda: rj.load(str(env.dir / "nowhere"))


def checkpoint_is_a_file(env):
    return lambda: rj.load(str(env.weights))


def shard_index_names_absent_file(env):
    env.weights.rename(env.ckpt / "model-00001-of-00002.safetensors")
    header, _ = Env.header(type("E", (), {"weights": env.ckpt / "model-00001-of-00002.safetensors"})())
    names = [k for k in header if k != "__metadata__"]
    weight_map = {k: "model-00001-of-00002.safetensors" for k in names[:-1]}
    weight_map[names[-1]] = "model-00002-of-00002.safetensors"
    (env.ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return env.model


def shard_index_without_weight_map(env):
    env.weights.rename(env.ckpt / "model-00001-of-00001.safetensors")
    (env.ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    return env.model


def gguf_unsupported_architecture(env):
    import gguf
    path = env.dir / "mamba.gguf"
    writer = gguf.GGUFWriter(path, "mamba")
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return lambda: rj.load(str(path))


def gguf_garbage(env):
    path = env.dir / "model.gguf"
    path.write_bytes(np.random.default_rng(1).bytes(2048))
    return lambda: rj.load(str(path))


def image_folder_without_images(env):
    from radial_jax.data import image_folder
    (env.dir / "imgs").mkdir()
    (env.dir / "imgs" / "notes.txt").write_text("no pictures here")
    return lambda: list(image_folder(env.dir / "imgs", 16))


def run_dir_of_another_kind(env):
    from radial_jax.radial.artifacts import load_student
    from radial_jax.checkpoints.artifacts import save_model
    save_model(rj.build(rj.OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                     num_attention_heads=2, max_position_embeddings=16)), env.dir / "lm")
    return lambda: load_student(env.dir / "lm")


def not_an_artifact(env):
    from radial_jax.radial.artifacts import load_student
    return lambda: load_student(env.ckpt)


def artifact_with_unserialisable_extra(env):
    from radial_jax.checkpoints.artifacts import save_model
    m = rj.build(rj.OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                              num_attention_heads=2, max_position_embeddings=16))
    return lambda: save_model(m, env.dir / "out", data=object())


def _ids(n=2, t=5):
    return np.arange(3, 3 + n * t, dtype=np.int32).reshape(n, t)


def mask_wrong_shape(env):
    m = env.model()
    return lambda: m(_ids(), np.ones((2, 4), bool))


def mask_not_binary(env):
    m = env.model()
    return lambda: m(_ids(), np.full((2, 5), 2))


def float_ids(env):
    m = env.model()
    return lambda: m(_ids().astype(np.float32))


def out_of_vocabulary_ids(env):
    m = env.model()
    return lambda: m(_ids() + 200)


def mesh_as_text(env):
    return lambda: rj.load(str(env.ckpt), mesh="1,1,1")


def ragged_ids(env):
    m = env.model()
    return lambda: m([[5, 6], [7]])


def one_dimensional_ids(env):
    m = env.model()
    return lambda: m(_ids()[0])


def too_long_ids(env):
    m = env.model()
    return lambda: m(np.full((1, 49), 5, np.int32))


def generate_zero_new_tokens(env):
    m = env.model()
    return lambda: m.generate(_ids(), max_new_tokens=0)


def generate_sampling_without_rng(env):
    m = env.model()
    return lambda: m.generate(_ids(), max_new_tokens=2, do_sample=True)


def prefill_with_positions(env):
    m = env.model()
    cache = m.module.init_cache(2, 8)
    ids = np.asarray(_ids())
    return lambda: m.module.apply({"params": m.params}, ids, cache=cache, prefill=True,
                                  positions_bt=np.zeros(ids.shape, np.int32))


def cached_call_without_positions(env):
    m = env.model()
    ids = np.asarray(_ids())
    return lambda: m.module.apply({"params": m.params}, ids, cache=m.module.init_cache(ids.shape[0], 8))


def _routed(env):
    from radial_jax.radial import RadialModel
    return RadialModel.from_sequential(env.model(), mode="radial", capacity_factor=3.0, max_steps=3)


def fit_capacity_batch_zero(env):
    rm = _routed(env)
    return lambda: rm.fit_capacity(_ids(), batch_size=0)


def fit_capacity_out_of_vocabulary(env):
    rm = _routed(env)
    return lambda: rm.fit_capacity(_ids() + 200)


def serving_speed_student_named_teacher(env):
    from radial_jax.serving.speed import serving_speed
    m = env.model()
    return lambda: serving_speed(m, {"teacher": _routed(env)}, _ids(8, 6), prompt_len=4, new_tokens=2)


def profile_of_padding_only(env):
    m = env.model()
    return lambda: rj.profile(m, [(_ids(), np.zeros((2, 5), bool))])


def simulate_with_text_thresholds(env):
    m = env.model()
    return lambda: rj.simulate_skipping(m, [(_ids(), np.ones((2, 5), bool))], ["x"])


def distill_threshold_above_one(env):
    from radial_jax.training.distill_loss import DistillConfig
    return lambda: DistillConfig(oracle_threshold=5.0)


def radial_zero_capacity(env):
    from radial_jax.radial import RadialConfig
    return lambda: RadialConfig(capacity_factor=0.0)


def radial_unknown_mode(env):
    from radial_jax.radial import RadialConfig
    return lambda: RadialConfig(mode="sideways")


def radial_zero_router_hidden(env):
    from radial_jax.radial import RadialConfig
    return lambda: RadialConfig(router_hidden=0)


def distill_unknown_train(env):
    from radial_jax.training.distill_loss import DistillConfig
    return lambda: DistillConfig(train="layers")


def thresholds_out_of_range(env):
    return lambda: rj.simulate_skipping(env.model(), [(_ids(), np.ones((2, 5), bool))], [1.5], progress=False)


def windows_bad_stride(env):
    from radial_jax.data import perplexity_windows
    return lambda: perplexity_windows(np.arange(100), 16, 32)


def cli_thresholds_not_numbers(env):
    return env.cli("simulate", "--model", env.ckpt, "--data", "embedded", "--thresholds", "0,abc",
                   "--out", env.dir / "out")


def cli_profile_missing_model(env):
    return env.cli("profile", "--model", env.dir / "nowhere", "--data", "embedded", "--out", env.dir / "out")


def cli_profile_garbage_checkpoint(env):
    env.weights.write_bytes(np.random.default_rng(2).bytes(1024))
    return env.cli("profile", "--model", env.ckpt, "--data", "embedded", "--window", "16", "--out", env.dir / "out")


def cli_eval_of_a_teacher_dir(env):
    run_dir_of_another_kind(env)
    return env.cli("eval", "--student", env.dir / "lm", "--out", env.dir / "out", "--no-progress")


def cli_distill_negative_radial_steps(env):  # refused before the teacher is even loaded (--teacher is absent)
    return env.cli("distill", "--teacher", env.dir / "nowhere", "--run-dir", env.dir / "run", "--radial-steps", "-1")


def cli_distill_radial_threshold_above_one(env):
    return env.cli("distill", "--teacher", env.dir / "nowhere", "--run-dir", env.dir / "run", "--radial-steps", "2",
                   "--radial-oracle-threshold", "3")


def cli_profile_batch_zero(env):
    return env.cli("profile", "--model", env.ckpt, "--data", "embedded", "--batch-size", "0", "--out", env.dir / "o")


def cli_profile_out_is_a_file(env):
    (env.dir / "afile").write_text("x")
    return env.cli("profile", "--model", env.ckpt, "--data", "embedded", "--window", "16", "--out", env.dir / "afile")


def cli_train_run_dir_is_a_file(env):
    (env.dir / "afile").write_text("x")
    return env.cli("train", "--run-dir", env.dir / "afile", "--size", "tiny", "--steps", "1")


def text_data_of_binary_files(env):
    from radial_jax.data.packed import text_data
    (env.dir / "texts").mkdir()
    (env.dir / "texts" / "a.txt").write_bytes(bytes(range(128, 256)))
    return lambda: text_data(str(env.dir / "texts"))


def cli_generate_negative_tokens(env):
    return env.cli("generate", "--model", env.ckpt, "--prompt", "x", "--max-new-tokens", "-3")


def cli_pipeline_bad_thresholds(env):
    return env.cli("pipeline", "--out", env.dir / "out", "--thresholds", "0,2")


def cli_pipeline_serve_tokens_beyond_window(env):
    return env.cli("pipeline", "--out", env.dir / "out", "--window", "16", "--serve-tokens", "16")


def cli_pipeline_no_serve_buckets(env):
    return env.cli("pipeline", "--out", env.dir / "out", "--serve-max-buckets", "0")


def cli_profile_bad_dtype(env):
    return env.cli("profile", "--model", env.ckpt, "--dtype", "float8", "--out", env.dir / "out")


CASES = [
    ("truncated safetensors", truncated_safetensors, CheckpointError, ["{dir}/ckpt/model.safetensors", "truncated"]),
    ("garbage safetensors", garbage_safetensors, CheckpointError, ["{dir}/ckpt/model.safetensors", "header of"]),
    ("2-byte safetensors", tiny_safetensors, CheckpointError, ["model.safetensors", "8-byte header"]),
    ("header not JSON", header_not_json, CheckpointError, ["model.safetensors", "not JSON"]),
    ("unsupported tensor dtype", unsupported_dtype, CheckpointError, ["model.safetensors", "unsupported dtype C64",
                                                                     "supported"]),
    ("tensor bytes outside the file", tensor_bytes_outside_file, CheckpointError, ["model.safetensors", "claims bytes"]),
    ("malformed config.json", malformed_config, CheckpointError, ["{dir}/ckpt/config.json", "not valid JSON"]),
    ("config.json not an object", config_not_an_object, CheckpointError, ["config.json", "expected an object"]),
    ("missing config.json", missing_config, CheckpointError, ["{dir}/ckpt", "no config.json"]),
    ("unknown model_type", unknown_model_type, CheckpointError, ["mamba"]),
    ("config disagrees with tensors", config_shape_mismatch, CheckpointError, ["{dir}/ckpt", "shape"]),
    ("config.json width as text", config_width_as_text, CheckpointError,
     ["{dir}/ckpt/config.json", "OPTConfig.hidden_size must be an integer", "'32' \\(str\\)"]),
    ("OPTConfig width as text", config_width_as_text_in_code, ValueError, ["OPTConfig.hidden_size", "integer", "'32'"]),
    ("LlamaConfig negative rms_norm_eps", negative_norm_epsilon, ValueError, ["rms_norm_eps", "> 0", "-1.0"]),
    ("OPTConfig word_embed_proj_dim=0", zero_embedding_projection, ValueError, ["word_embed_proj_dim", ">= 1"]),
    ("no checkpoint directory", no_checkpoint_dir, CheckpointError, ["{dir}/nowhere", "no checkpoint directory"]),
    ("checkpoint path is a file", checkpoint_is_a_file, CheckpointError, ["model.safetensors", "is a file"]),
    ("shard index names an absent file", shard_index_names_absent_file, CheckpointError,
     ["model-00002-of-00002.safetensors", "missing"]),
    ("shard index without weight_map", shard_index_without_weight_map, CheckpointError,
     ["model.safetensors.index.json", "weight_map"]),
    ("GGUF of an unsupported architecture", gguf_unsupported_architecture, CheckpointError,
     ["{dir}/mamba.gguf", "'mamba'", "not supported"]),
    ("GGUF of random bytes", gguf_garbage, CheckpointError, ["{dir}/model.gguf"]),
    ("image folder without images", image_folder_without_images, ValueError, ["no images", "{dir}/imgs"]),
    ("run dir of another kind", run_dir_of_another_kind, ValueError, ["{dir}/lm", "'lm'", "radial_student"]),
    ("artifact with a non-JSON extra", artifact_with_unserialisable_extra, TypeError, ["not JSON serializable"]),
    ("checkpoint given as a run dir", not_an_artifact, ValueError, ["{dir}/ckpt", "not a radial_jax training artifact"]),
    ("attention_mask of the wrong shape", mask_wrong_shape, ValueError, ["attention_mask", r"\(2, 4\)", r"\(2, 5\)"]),
    ("attention_mask not 0/1", mask_not_binary, ValueError, ["attention_mask", "0/1"]),
    ("float token ids", float_ids, ValueError, ["input_ids", "integers", "float32"]),
    ("out-of-vocabulary ids", out_of_vocabulary_ids, ValueError, [r"\[0, 96\)", "tokenizer of another model"]),
    ("1-D token ids", one_dimensional_ids, ValueError, ["input_ids", "2-D"]),
    ("load with a mesh given as text", mesh_as_text, ValueError, ["jax.sharding.Mesh", "make_mesh", "'1,1,1'"]),
    ("ragged token ids", ragged_ids, ValueError, ["input_ids", "rectangular", "attention_mask"]),
    ("too many tokens", too_long_ids, ValueError, ["49", "48 positions"]),
    ("generate max_new_tokens=0", generate_zero_new_tokens, ValueError, ["max_new_tokens", ">= 1"]),
    ("sampling without rng", generate_sampling_without_rng, ValueError, ["rng"]),
    ("prefill with positions", prefill_with_positions, ValueError, ["prefill=True", "no positions_bt", "0 .. t - 1"]),
    ("cached call without positions", cached_call_without_positions, ValueError,
     ["cached calls need explicit positions_bt", "prefill=True"]),
    ("fit_capacity batch_size=0", fit_capacity_batch_zero, ValueError, ["batch_size", ">= 1", "got 0"]),
    ("serving_speed student named 'teacher'", serving_speed_student_named_teacher, ValueError,
     ["may not be named 'teacher'", r"\['teacher'\]"]),
    ("fit_capacity on out-of-vocabulary ids", fit_capacity_out_of_vocabulary, ValueError, [r"\[0, 96\)"]),
    ("profile of padding only", profile_of_padding_only, ValueError, ["no token to profile", "all 0"]),
    ("simulate with thresholds as text", simulate_with_text_thresholds, ValueError,
     ["thresholds", r"\[0, 1\]", "'x'"]),
    ("DistillConfig oracle_threshold=5", distill_threshold_above_one, ValueError,
     ["oracle_threshold", r"\[0, 1\]", "5.0"]),
    ("RadialConfig capacity_factor=0", radial_zero_capacity, ValueError, ["capacity_factor", "> 0"]),
    ("RadialConfig unknown mode", radial_unknown_mode, ValueError, ["mode", "'sideways'", "allowed"]),
    ("RadialConfig router_hidden=0", radial_zero_router_hidden, ValueError, ["router_hidden", ">= 1"]),
    ("DistillConfig unknown train", distill_unknown_train, ValueError, ["train", "'layers'", "router"]),
    ("thresholds outside [0, 1]", thresholds_out_of_range, ValueError, ["thresholds", r"\[0, 1\]", "1.5"]),
    ("windows with stride > window", windows_bad_stride, ValueError, ["stride=32", "window=16"]),
    ("CLI simulate --thresholds 0,abc", cli_thresholds_not_numbers, CLIError, ["--thresholds", "'abc'", "number"]),
    ("CLI profile of a missing model", cli_profile_missing_model, CLIError, ["{dir}/nowhere"]),
    ("CLI profile of a garbage checkpoint", cli_profile_garbage_checkpoint, CLIError, ["model.safetensors"]),
    ("CLI eval of a teacher dir", cli_eval_of_a_teacher_dir, CLIError, ["{dir}/lm", "'lm'"]),
    ("CLI distill --radial-steps -1", cli_distill_negative_radial_steps, CLIError, ["--radial-steps", ">= 0", "-1"]),
    ("CLI distill --radial-oracle-threshold 3", cli_distill_radial_threshold_above_one, CLIError,
     ["oracle_threshold", r"\[0, 1\]", "3.0"]),
    ("CLI profile --batch-size 0", cli_profile_batch_zero, CLIError, ["--batch-size", ">= 1", "got 0"]),
    ("CLI profile --out a file", cli_profile_out_is_a_file, CLIError, ["--out", "{dir}/afile", "is a file"]),
    ("CLI train --run-dir a file", cli_train_run_dir_is_a_file, CLIError, ["--run-dir", "{dir}/afile", "is a file"]),
    ("text of binary .txt files", text_data_of_binary_files, ValueError, ["{dir}/texts/a.txt", "not UTF-8"]),
    ("CLI generate --max-new-tokens -3", cli_generate_negative_tokens, CLIError, ["--max-new-tokens", ">= 1"]),
    ("CLI pipeline --thresholds 0,2", cli_pipeline_bad_thresholds, CLIError, ["thresholds", r"\[0, 1\]"]),
    ("CLI pipeline --serve-tokens >= --window", cli_pipeline_serve_tokens_beyond_window, CLIError,
     ["--serve-tokens", r"\[1, 16\)", "got 16"]),
    ("CLI pipeline --serve-max-buckets 0", cli_pipeline_no_serve_buckets, CLIError,
     ["--serve-max-buckets", ">= 1", "got 0"]),
    ("CLI profile --dtype float8", cli_profile_bad_dtype, CLIError, ["float8", "float32"]),
]


@pytest.mark.parametrize("make, exception, patterns", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_fails_clearly(tmp_path, good_ckpt, capsys, make, exception, patterns):
    env = Env(tmp_path, good_ckpt, capsys)
    call = make(env)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(exception) as e:
        call()
    assert not isinstance(e.value, MemoryError)
    message = str(e.value)
    for pattern in patterns:
        assert re.search(pattern.replace("{dir}", re.escape(str(tmp_path))), message), (pattern, message)
    # nothing half-written: the failed call left no new file or directory behind
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert after == before, set(after) - set(before)


def test_the_table_is_broad():
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)
    assert sum(c[2] is CLIError for c in CASES) >= 5


def test_numpy_scalars_are_numbers_in_every_config():
    """What a numpy computation hands over (``np.int64(4)``, ``np.float32(0.5)``) is accepted as the Python
    number it is, so configs built from arrays hash, compare and serialise like hand-written ones."""
    from radial_jax.radial.config import RadialConfig
    opt = rj.OPTConfig(hidden_size=np.int64(32), num_hidden_layers=np.int32(2), ffn_dim=64, num_attention_heads=2)
    assert opt == rj.OPTConfig(hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2)
    assert type(opt.hidden_size) is int and hash(opt) == hash(rj.OPTConfig(hidden_size=32, num_hidden_layers=2,
                                                                          ffn_dim=64, num_attention_heads=2))
    rc = RadialConfig(mode="radial", capacity_factor=np.float32(0.5), max_steps=np.int64(4))
    assert (rc.capacity_factor, rc.max_steps) == (0.5, 4) and type(rc.max_steps) is int
    assert rj.LlamaConfig(rms_norm_eps=np.float32(1e-5)).rms_norm_eps == pytest.approx(1e-5)
    with pytest.raises(ValueError, match=r"RadialConfig.capacity_factor must be a number, got True"):
        RadialConfig(capacity_factor=True)


def test_weights_holding_nan_load_with_a_warning_naming_the_tensor(tmp_path, good_ckpt):
    """A checkpoint saved after a divergence loads (it may be inspected) but says so: every output would be NaN."""
    import torch
    from conftest import make_opt
    ref = make_opt(tmp_path / "nan", seed=5)
    with torch.no_grad():
        ref.model.decoder.layers[1].fc1.weight[0, 0] = float("nan")
    ref.save_pretrained(tmp_path / "nan")
    with pytest.warns(UserWarning, match=r"1 tensors hold NaN or inf \(.*'layers'.*fc1.*\)"):
        rj.load(str(tmp_path / "nan"))
    import jax
    from radial_jax.models.bundle import Model
    from radial_jax.checkpoints.artifacts import save_model
    good = rj.load(str(good_ckpt))
    params = jax.tree_util.tree_map(np.array, good.params)
    params["final_norm"]["scale"][0] = np.inf  # a model trained here and saved after a divergence: the same warning
    save_model(Model(good.config, params, name="diverged"), tmp_path / "trained")
    with pytest.warns(UserWarning, match=r"1 tensors hold NaN or inf \(\['final_norm'\]\['scale'\]\)"):
        rj.load(str(tmp_path / "trained"))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a finite checkpoint loads without it
        rj.load(str(good_ckpt))
