"""``radial-jax --version``, ``radial-jax generate`` (sequential and routed) and clean one-line errors."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import radial_jax as rj
from radial_jax.cli import main
from radial_jax.data import offline_tokenizer


def test_version_flag_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"radial-jax {rj.__version__}"


@pytest.fixture(scope="module")
def checkpoint_with_tokenizer(tmp_path_factory):
    """A tiny random OPT saved by transformers with the offline tokenizer beside it, and a routed student."""
    from conftest import make_opt
    from radial_jax.radial.artifacts import save_student
    from radial_jax.training.distill_loss import make_student
    d = tmp_path_factory.mktemp("gen")
    tok = offline_tokenizer()
    make_opt(d / "ckpt", seed=3, vocab_size=len(tok), max_position_embeddings=64)
    tok.save_pretrained(d / "ckpt")
    student = make_student(rj.load(str(d / "ckpt")), mode="ordered")
    save_student(student, d / "run" / "student", teacher=str(d / "ckpt"))
    return d


def test_generate_prints_text_and_routed_depth_and_flops(checkpoint_with_tokenizer, capsys):
    d = checkpoint_with_tokenizer
    argv = ["generate", "--model", str(d / "ckpt"), "--prompt", "The for statement", "--max-new-tokens", "5"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("The for statement") and "routed" not in out
    assert main(argv + ["--student", str(d / "run"), "--temperature", "0.8", "--top-k", "20", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "[model]" in out and "[student]" in out
    routed = next(line for line in out.splitlines() if line.startswith("routed:"))
    assert "mean depth" in routed and "executed FLOPs" in routed and "depth per token" in routed


def test_routed_summary_of_a_dense_route_is_the_sequential_cost(checkpoint_with_tokenizer):
    """Identity routing runs every layer: depth 1 and executed FLOPs a little above 1 (the router)."""
    import numpy as np
    from radial_jax.serving.cli import routed_summary
    from radial_jax.radial import RadialModel
    model = rj.load(str(checkpoint_with_tokenizer / "ckpt"))
    student = RadialModel.from_sequential(model, routing="identity")
    ids = np.arange(5, 13, dtype=np.int32)[None]
    out = student.generate(ids, max_new_tokens=4, eos_token_id=(), return_output=True)
    s = routed_summary(out, student, ids.shape[1])
    assert s["mean_depth"] == 1.0 and s["new_tokens"] == 4
    assert 1.0 <= s["executed_flops_fraction"] < 1.2


@pytest.mark.parametrize("argv, names", [
    (["generate", "--model", "/nonexistent/ckpt", "--prompt", "hi"], "/nonexistent/ckpt"),
    (["generate", "--model", "{ckpt}", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", "--model", "{ckpt}", "--prompt", "hi", "--temperature", "-1"], "--temperature"),
    (["generate", "--model", "{ckpt}", "--prompt", "hi", "--student", "/nonexistent/run"], "/nonexistent/run"),
    (["generate", "--model", "{ckpt}", "--prompt", "hi", "--max-new-tokens", "500"], "positions"),
])
def test_cli_errors_are_one_clean_line_and_exit_2(checkpoint_with_tokenizer, capsys, argv, names):
    argv = [a.format(ckpt=checkpoint_with_tokenizer / "ckpt") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("radial-jax generate: error: ") and names in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_the_command_prints_no_transformers_advice(tmp_path):
    """A fresh process: no "PyTorch was not found" (nor any other) advisory warning from transformers."""
    r = subprocess.run([sys.executable, "-m", "radial_jax.cli", "generate", "--model", str(tmp_path / "none"),
                        "--prompt", "x"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "PyTorch was not found" not in r.stderr
    assert r.stderr.strip().startswith("radial-jax generate: error:"), r.stderr


@pytest.mark.parametrize("raise_it, code, says", [
    (lambda: np.zeros(-1), 1, "internal error (ValueError)"),  # numpy's ValueError: a bug that let it through
    (lambda: (_ for _ in ()).throw(KeyError("k")), 1, "internal error (KeyError)"),
    (lambda: rj.OPTConfig(hidden_size=0), 2, "error: OPTConfig.hidden_size must be an integer >= 1"),  # our check
    (lambda: open("/nonexistent/file"), 2, "error: [Errno 2] No such file or directory"),
])
def test_a_usage_error_exits_2_in_one_line_and_an_internal_error_exits_1_with_its_traceback(monkeypatch, capsys,
                                                                                             raise_it, code, says):
    import radial_jax.serving.cli as serving_cli
    monkeypatch.setattr(serving_cli, "cmd_generate", lambda args: raise_it())
    assert main(["generate", "--model", "m", "--prompt", "p"]) == code
    err = capsys.readouterr().err
    assert says in err
    if code == 2:
        assert err.count("\n") == 1 and "Traceback" not in err
    else:
        assert "Traceback" in err and "please report it" in err


def test_the_compile_cache_is_a_folder_the_user_moves_or_turns_off(tmp_path, monkeypatch):
    import jax
    from radial_jax.cli import use_compile_cache
    before = jax.config.jax_compilation_cache_dir
    try:
        assert use_compile_cache("off") is None and jax.config.jax_compilation_cache_dir == before
        assert use_compile_cache(str(tmp_path / "xla")) == tmp_path / "xla"
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
        monkeypatch.setattr("radial_jax.data.corpus.CACHE_DIR", tmp_path / "home")
        assert use_compile_cache("") == tmp_path / "home" / "xla"  # the default: under radial_jax's cache
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_every_subcommand_help_says_what_it_does_and_every_flags_default():
    import argparse
    from radial_jax.cli import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        text = " ".join(command.format_help().split())
        assert command.description and " ".join(command.description.split()) in text, name
        for action in command._actions:
            if action.option_strings and action.default not in (None, argparse.SUPPRESS) and action.dest != "help":
                assert f"(default: {action.default})" in text or "%(default)" in (action.help or ""), \
                    (name, action.dest)
