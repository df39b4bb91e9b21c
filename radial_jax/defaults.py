"""Every default value in one place: the API's dataclasses and the CLI's flags both read them here.

One fact, one constant (like nanodo's or big_vision's configs). The values are those of the
code path that produced the README's results, ``radial-jax pipeline`` (``radial_jax.pipeline``);
``radial-jax train | distill | eval``, ``DistillConfig``, ``TrainConfig``, ``OptimConfig``,
``RadialConfig`` and ``JointConfig`` use the same ones. This module imports nothing, so
anything may import it.
"""
from __future__ import annotations

# -- teacher size presets: OPT-shaped (the vocabulary comes from the tokenizer) --------------------
SIZES = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2),
    "small": dict(hidden_size=64, num_hidden_layers=4, ffn_dim=256, num_attention_heads=4),
    "base": dict(hidden_size=128, num_hidden_layers=6, ffn_dim=512, num_attention_heads=4),
}
SIZE = "small"
MIN_POSITIONS = 256  # max_position_embeddings of a trained teacher: at least this, at least the window

# -- data --------------------------------------------------------------------------------------------
# the standard library's documentation and sources (4.5M training tokens with the offline BPE), held out by
# document; "embedded" (Python's topic help, 116k training tokens) is repeated for epochs by the pipeline's
# teacher, and a deeper model overfits it sooner
DATA = "stdlib"
EVAL_FRACTION = 0.1  # held-out share of the token stream
STDLIB_HELD_OUT = 0.05  # held-out share of the "stdlib" source's documents (split by document name)
WINDOW = 64  # tokens per training / evaluation window of the small models
BATCH_SIZE = 16  # global batch (training) and evaluation batch
MAX_WINDOWS = 256  # held-out windows for profile / simulate / evaluate
SEED = 0

# -- teacher training (TrainConfig, OptimConfig) -------------------------------------------------------
TEACHER_STEPS = 600
LEARNING_RATE = 3e-3
WARMUP_STEPS = 20
DECAY_STEPS = 200
CHECKPOINT_EVERY = 100

# -- distillation (DistillConfig) ----------------------------------------------------------------------
DISTILL_STEPS = 600  # the ordered student
RADIAL_STEPS = 200  # the radial student, continued from the ordered one (pipeline)
DISTILL_LR = 1e-3
DISTILL_TRAIN = "all"  # "router": layers frozen; "all": everything
TEMPERATURE = 2.0
ROUTER_WEIGHT = 0.5
HIDDEN_WEIGHT = 0.0
ORACLE_THRESHOLD = 0.35  # oracle keep labels supervising the router (§3 per layer)
COMPUTE_WEIGHT = 0.8  # weight of the expected-compute penalty (the ordered student)
# the radial student, continued from the ordered one: a penalty as strong as the ordered one's makes it
# exit so early that perplexity blows up (radial exits are cheap in the penalty, costly in quality)
RADIAL_COMPUTE_WEIGHT = 0.3
# the radial phase trains the router alone over the ordered student's layers: trained with them, on the
# small teacher it kept more depth than the ordered student and reused none (experiments/radial_vs_ordered.py)
RADIAL_DISTILL_TRAIN = "router"
# oracle keep labels of the radial phase: with the router alone, depth follows the labels more than the
# compute weight (a higher threshold labels fewer keeps: less depth, more perplexity)
RADIAL_ORACLE_THRESHOLD = 0.22
# the students' cache policy: "mask" (a skipped layer costs nothing, its K/V slot stays empty) or "propagate"
# (a skipped layer still pays its K/V projection, about a sixth of a layer at the small sizes)
DISTILL_CACHE_POLICY = "mask"
ROUTER_HIDDEN = 16  # width of the router MLP (RadialConfig, DistillConfig, JointConfig)

# -- oracle simulation and evaluation ---------------------------------------------------------------------
# pipeline sweep (small trained teachers: ratios spread over [0, 0.5])
PIPELINE_THRESHOLDS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)
# ``radial-jax simulate`` on hub checkpoints, whose ratios are mostly small: a finer low end
SIMULATE_THRESHOLDS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2)
# the layer and block oracle curves of ``radial-jax eval``
EVAL_THRESHOLDS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.8)
EVAL_OFFSETS = (-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0)  # router keep offsets of a student's curve
RATIO = "out"  # ratio_out = |f(x)| / |x + f(x)|

# -- profile / simulate on checkpoints ------------------------------------------------------------------------
PROFILE_WINDOW = 512  # tokens per window on hub models (capped at the model's context)
PROFILE_BATCH_SIZE = 8
MAX_IMAGES = 256

# -- serving speed (pipeline) ----------------------------------------------------------------------------------
SERVE_REPEATS = 5
SERVE_CALIBRATION_WINDOWS = 64  # training-split windows the serving capacity is fitted on
SERVE_MAX_PADDING = 0.05  # tokens a served layer's matmuls may run beyond its load on calibration text
SERVE_MAX_BUCKETS = 32  # static prefill sizes at most (compile time grows with them: about 3x at 32 vs 8)
# the pipeline serves its toy for a few timed rounds, so compile time outweighs padding there: at most 8 sizes
# (it prints the padding each bucket count gives, and serving_speed the compile seconds)
PIPELINE_SERVE_MAX_BUCKETS = 8
SERVE_TOKENS = 32  # decode steps timed per row, after a prompt of WINDOW - SERVE_TOKENS tokens

# -- generation (``radial-jax generate``) --------------------------------------------------------------------
MAX_NEW_TOKENS = 32
TEMPERATURE_SAMPLING = 0.0  # 0: greedy


def csv(values) -> str:
    """A tuple of numbers as the comma-separated string a CLI flag takes."""
    return ",".join(f"{v:g}" for v in values)
