"""Shared fixtures: tiny random checkpoints written by transformers (PyTorch) with ``save_pretrained``.

They are the independent reference of the test-suite: our code loads the files
in hub layout, and the same files give the transformers models we compare to.
All parameters are perturbed away from their init (biases 0, norms 1) so that
every tensor's mapping matters.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests run tiny models, whose cost is compilation: LLVM's cheapest code generation compiles about 2.5x
# faster and changes nothing XLA computes (benchmarks in experiments/ never set it).
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()


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
