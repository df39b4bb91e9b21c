"""Published ``config.json`` values of the large teachers, so that ``radial-jax plan`` runs offline.

Each entry is the model's ``config.json`` as published on the Hugging Face hub (the
fields our family configs read, plus ``model_type``), keyed by its hub id, with
its source. ``radial-jax plan --model facebook/opt-6.7b`` uses the entry here
before trying the hub, so the plans in ``results/plan_pod.json`` need no network.
"""
from __future__ import annotations

PUBLISHED_CONFIGS = {
    "facebook/opt-6.7b": {
        "_source": "https://huggingface.co/facebook/opt-6.7b/blob/main/config.json",
        "model_type": "opt", "activation_function": "relu", "do_layer_norm_before": True,
        "hidden_size": 4096, "ffn_dim": 16384, "num_attention_heads": 32, "num_hidden_layers": 32,
        "max_position_embeddings": 2048, "vocab_size": 50272, "word_embed_proj_dim": 4096,
        "enable_bias": True, "layer_norm_elementwise_affine": True, "tie_word_embeddings": True,
        "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 2, "torch_dtype": "float16",
    },
    "meta-llama/Llama-3.1-8B": {
        "_source": "https://huggingface.co/meta-llama/Llama-3.1-8B/blob/main/config.json",
        "model_type": "llama", "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False, "vocab_size": 128256,
        "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
    },
}
