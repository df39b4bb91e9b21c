"""What llama.cpp does to tensors on the way into a GGUF file, undone: the q/k row permutation of Llama files,
and Llama 3 RoPE scaling, which it writes as per-frequency factors (``rope_freqs.weight``) instead of metadata."""
from __future__ import annotations

import math

import numpy as np


def unpermute_rows(x: np.ndarray, n_head: int) -> np.ndarray:
    """Reverse llama.cpp's ``permute`` of q/k rows: per head, [pairs interleaved] -> [first halves, second halves].

    llama.cpp writes ``w.reshape(n_head, 2, d, ...).swapaxes(1, 2)``; this is its inverse.
    """
    half = x.shape[0] // n_head // 2
    return x.reshape(n_head, half, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def llama3_factors(inv_freq: np.ndarray, factor: float, low: float, high: float, original: float) -> np.ndarray:
    """Per-frequency divisors of the rotary frequencies under Llama 3 scaling (transformers' and llama.cpp's rule)."""
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    medium = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, medium))


def llama3_parameters(factors: np.ndarray, theta: float, dim: int, rtol: float = 1e-4):
    """Llama 3 rope scaling reproducing llama.cpp's ``rope_freqs`` factors: {} if all are 1, None if none fits.

    ``factor`` is the largest factor. Only the ratios ``original / low_freq_factor``
    and ``original / high_freq_factor`` matter, so they are solved for with
    ``low_freq_factor`` 1 (least squares over the frequencies between the two
    wavelengths), then both factors are scaled so that
    ``original_max_position_embeddings`` is an integer. Meta's published
    parameters (low 1, high 4, original 8192) are tried first. Whatever is
    returned reproduces the file's factors to ``rtol``.
    """
    if np.allclose(factors, 1.0, rtol=rtol, atol=0):
        return {}
    inv_freq = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * math.pi / inv_freq
    factor = float(factors.max())
    if factor <= 1.0:
        return None
    ones = np.isclose(factors, 1.0, rtol=rtol, atol=0)
    full = np.isclose(factors, factor, rtol=rtol, atol=0)
    medium = ~ones & ~full
    candidates = [(1.0, 4.0, 8192.0)]
    highs = sorted(np.geomspace(1.01, 1000.0, 97), key=lambda h: abs(math.log(h / 4.0)))  # 4 first
    if medium.sum() >= 2:
        # smooth = (L / wavelen - 1) / (high - 1), with smooth from each medium factor: linear in (L, high)
        s = (1.0 / factors[medium] - 1.0 / factor) / (1.0 - 1.0 / factor)
        a = np.stack([1.0 / wavelen[medium], -s], axis=1)
        (original, high), *_ = np.linalg.lstsq(a, 1.0 - s, rcond=None)
        candidates.append((1.0, float(high), float(original)))
    elif medium.sum() == 1:  # one equation for two unknowns: any high that classifies the rest right
        s = float((1.0 / factors[medium][0] - 1.0 / factor) / (1.0 - 1.0 / factor))
        w = float(wavelen[medium][0])
        candidates += [(1.0, float(h), (s * (h - 1.0) + 1.0) * w) for h in highs]
    else:  # wavelengths of the unscaled ones under original / high, of the fully scaled ones over original
        below = float(wavelen[ones].max()) if ones.any() else 1e-3
        above = float(wavelen[full].min())
        candidates += [(1.0, float(h), math.sqrt(below * h * above)) for h in highs if below * h < above]
    for low, high, original in candidates:
        if not (high > low and original >= 1.0):
            continue
        # an integer original_max_position_embeddings, with both ratios kept by scaling the two factors alike
        scale = round(original) / original
        low, high, original = low * scale, high * scale, float(round(original))
        if np.allclose(llama3_factors(inv_freq, factor, low, high, original), factors, rtol=rtol, atol=0):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": float(low),
                    "high_freq_factor": float(high), "original_max_position_embeddings": int(original)}
    return None
