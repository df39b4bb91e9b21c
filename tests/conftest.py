"""Shared fixtures: tiny random checkpoints written by transformers (PyTorch) with ``save_pretrained``.

They are the independent reference of the test-suite: our code loads the files
in hub layout, and the same files give the transformers models we compare to.
All parameters are perturbed away from their init (biases 0, norms 1) so that
every tensor's mapping matters.
"""
from __future__ import annotations

import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the commands' persistent compilation cache stays off in tests (nothing written under the user's home), unless a
# developer asks for one: RADIAL_JAX_COMPILE_CACHE=/some/folder python -m pytest ...
os.environ.setdefault("RADIAL_JAX_COMPILE_CACHE", "off")


def _has_xla_flag(flag: str) -> bool:
    """Whether ``XLA_FLAGS`` sets ``flag``'s option already, to any value (xdist workers inherit the
    controller's environment; a value set by the user is kept)."""
    return any(f.split("=")[0] == flag.split("=")[0] for f in os.environ.get("XLA_FLAGS", "").split())


def _add_xla_flag(flag: str) -> None:
    if not _has_xla_flag(flag):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()


def _xla_accepts(flag: str) -> bool:
    """Whether this jax starts and runs a jit with ``flag`` (an unknown flag aborts the process): probed
    once in a throwaway process, the answer handed to the xdist workers in the environment."""
    key = "RADIAL_JAX_TEST_XLA_PROBE_" + "".join(c if c.isalnum() else "_" for c in flag.strip("-"))
    if key not in os.environ:
        env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip())
        try:
            ok = subprocess.run([sys.executable, "-c", "import jax, jax.numpy as jnp; "
                                 "jax.block_until_ready(jax.jit(lambda x: x * 2 + 1)(jnp.arange(3.0)))"],
                                env=env, capture_output=True, timeout=300).returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
        os.environ[key] = "1" if ok else "0"
    return os.environ[key] == "1"


# Tests run tiny models, whose cost is compilation (benchmarks in experiments/ set neither flag):
# * LLVM's cheapest code generation compiles about 2.5x faster and changes nothing XLA computes;
# * the CPU backend's older (non-"fusion emitter") code generation compiles tiny programs much faster; it
#   rounds differently (logits move by ~1e-7). A jax that does not know the flag would abort on it, so it is
#   used only where a throwaway process accepted it.
FAST_COMPILE = "--xla_backend_optimization_level=0"
NO_FUSION_EMITTERS = "--xla_cpu_use_fusion_emitters=false"
_add_xla_flag(FAST_COMPILE)
if not _has_xla_flag(NO_FUSION_EMITTERS) and _xla_accepts(NO_FUSION_EMITTERS):
    _add_xla_flag(NO_FUSION_EMITTERS)


def xla_flags(*flags: str) -> str:
    """``XLA_FLAGS`` for a test's subprocess: the suite's own plus ``flags``."""
    return " ".join((os.environ["XLA_FLAGS"],) + flags)

import pytest

OPT_BASE = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, ffn_dim=64, num_attention_heads=4,
                max_position_embeddings=48, pad_token_id=1, bos_token_id=2, eos_token_id=2, dropout=0.0,
                attention_dropout=0.0, word_embed_proj_dim=32)

# Together these cover every OPT flag the published checkpoints use.
OPT_VARIANTS = {
    "pre_ln": {},
    "post_ln_projection": dict(do_layer_norm_before=False, word_embed_proj_dim=16),  # OPT-350M style
    "no_bias_non_affine": dict(enable_bias=False, layer_norm_elementwise_affine=False),
    "untied_no_final_ln_gelu": dict(tie_word_embeddings=False, _remove_final_layer_norm=True,
                                    activation_function="gelu"),
}

VIT_BASE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
                patch_size=4, num_channels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def perturb_(model, seed: int, scale: float = 0.05):
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def make_opt(directory, seed: int = 0, **overrides):
    """Save a tiny random ``OPTForCausalLM`` to ``directory``; returns the torch model (eval mode)."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM
    torch.manual_seed(seed)
    model = perturb_(OPTForCausalLM(OPTConfig(**{**OPT_BASE, **overrides})), seed).eval()
    model.save_pretrained(directory)
    return model


def make_vit(directory, seed: int = 0, classifier: bool = True, **overrides):
    """Save a tiny random ViT (classifier, or bare encoder with pooler) to ``directory``."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTModel
    torch.manual_seed(seed)
    config = ViTConfig(**{**VIT_BASE, **overrides})
    if classifier:
        config.id2label = {i: f"class_{i}" for i in range(5)}
        config.label2id = {v: k for k, v in config.id2label.items()}
        model = ViTForImageClassification(config)
    else:
        model = ViTModel(config, add_pooling_layer=True)
    model = perturb_(model, seed).eval()
    model.save_pretrained(directory)
    return model


@pytest.fixture(autouse=True, scope="module")
def _compiled_programs_freed_per_module():
    """Every compiled program holds a few memory mappings until JAX's caches let it go. One process that
    runs the whole suite (``-n 0``) compiled enough to pass the kernel's limit on mappings
    (``vm.max_map_count``, 65530 by default) and aborted inside XLA's compiler halfway through; each of two
    workers compiles about half as much. The programs are freed after each test module."""
    yield
    import jax
    jax.clear_caches()


@pytest.fixture(scope="session")
def tiny_opt_variants(tmp_path_factory):
    """name -> checkpoint directory, one per entry of ``OPT_VARIANTS``."""
    root = tmp_path_factory.mktemp("opt")
    dirs = {}
    for i, (name, overrides) in enumerate(OPT_VARIANTS.items()):
        make_opt(root / name, seed=i, **overrides)
        dirs[name] = root / name
    return dirs


@pytest.fixture(scope="session")
def tiny_opt_dir(tiny_opt_variants):
    return tiny_opt_variants["pre_ln"]


@pytest.fixture(scope="session")
def tiny_vit_cls_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("vit_cls")
    make_vit(d, seed=10, classifier=True)
    return d


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("vit_bare")
    make_vit(d, seed=11, classifier=False)
    return d


# -- scheduling under pytest-xdist (``--dist loadgroup --no-loadscope-reorder``, setup.cfg) -------------------
# Modules known to take longest, longest first (measured with ``--durations``; a module of this list runs
# first with all its tests, grouped or not), so that the work started last is short and no worker idles at
# the end while the other finishes a long module.
LONGEST_FIRST = ("test_training", "test_real_gemma")


def _module_name(item) -> str:
    module = getattr(item, "module", None)
    return module.__name__ if module is not None else item.nodeid.split("::")[0]


def _module_scoped(item) -> bool:
    """Whether ``item`` uses a fixture of module scope (computed once per module in each worker)."""
    info = getattr(item, "_fixtureinfo", None)
    return info is not None and any(defs and defs[-1].scope == "module" for defs in info.name2fixturedefs.values())


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    """Tests that use a module-scoped fixture share one xdist worker (``xdist_group`` named after their
    module), so that the fixture is computed once, not once per worker. Then the order in which work is
    handed out: the modules of ``LONGEST_FIRST``, then the other modules with a group, the largest group
    first (what xdist's own reordering would do), then the rest in collection order. Every worker sorts the
    same collection the same way (xdist requires equal collections)."""
    grouped = {}
    for item in items:
        if _module_scoped(item):
            name = _module_name(item)
            item.add_marker(pytest.mark.xdist_group(name=name))
            grouped[name] = grouped.get(name, 0) + 1
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}

    def key(item):
        name = _module_name(item)
        return rank.get(name, len(rank)), -grouped.get(name, 0)
    items.sort(key=key)  # stable: collection order within a module, and among the rest
