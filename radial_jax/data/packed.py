"""Deterministic, resumable, process-sharded batches of packed fixed windows.

A text source becomes one long 1-D token stream (documents joined by EOS);
the stream is cut into windows of ``seq_len`` tokens (packing, no padding).
Batch ``p`` (the *data position*: global batches consumed so far) is a pure
function of ``(seed, p)``: epoch ``p // batches_per_epoch`` uses its own
permutation of the windows, so a run resumed at position ``p`` sees exactly
the batches an uninterrupted run would. Each process takes its own
contiguous rows of the global batch (``process_index``/``process_count``), so
a multi-host run assembles global arrays from per-process data.

Sources are those of ``radial_jax.data.load_text_source`` (``"embedded"``:
the offline corpus and BPE tokenizer; ``"wikitext2"``: cached files only;
``"stdlib"``: the standard library's documentation and sources, held out by
document; a ``.txt`` file or a directory of them), or a token array.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Union

import numpy as np

from radial_jax import defaults as D
from radial_jax.data.corpus import load_text_source, tokenize


@dataclasses.dataclass
class PackedDataset:
    """Fixed windows of ``seq_len`` tokens from a token stream, batched deterministically.

    ``batch_size`` is the *global* batch; this process yields rows
    ``[process_index * b_local, (process_index + 1) * b_local)`` of each global batch.
    """

    tokens: np.ndarray
    seq_len: int
    batch_size: int
    seed: int = 0
    shuffle: bool = True
    process_index: int = 0
    process_count: int = 1
    bos_token_id: Optional[int] = None  # set: each window is BOS + seq_len - 1 tokens of the stream

    def __post_init__(self):
        self.tokens = np.asarray(self.tokens)
        if self.tokens.ndim != 1 or not np.issubdtype(self.tokens.dtype, np.integer):
            raise ValueError(f"tokens must be a 1-D integer array, got {self.tokens.dtype} {self.tokens.shape}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.batch_size < 1 or self.batch_size % self.process_count:
            raise ValueError(f"global batch_size {self.batch_size} must be >= 1 and divisible by "
                             f"process_count {self.process_count}")
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index {self.process_index} outside [0, {self.process_count})")
        if self.batches_per_epoch < 1:
            raise ValueError(f"{len(self.tokens)} tokens make {self.num_windows} windows of {self.seq_len}; "
                             f"need at least batch_size={self.batch_size}")

    @property
    def _stride(self) -> int:
        """Stream tokens per window (one fewer when every window opens with BOS)."""
        return self.seq_len - (self.bos_token_id is not None)

    @property
    def num_windows(self) -> int:
        return len(self.tokens) // self._stride

    def _windows(self, rows: np.ndarray) -> np.ndarray:
        idx = rows[:, None] * self._stride + np.arange(self._stride)[None, :]
        out = self.tokens[idx].astype(np.int32)
        if self.bos_token_id is not None:
            out = np.concatenate([np.full((len(rows), 1), self.bos_token_id, np.int32), out], axis=1)
        return out

    @property
    def batches_per_epoch(self) -> int:
        return self.num_windows // self.batch_size

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.process_count

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_windows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)

    def global_batch(self, position: int) -> np.ndarray:
        """The whole global batch at ``position``: int32 ``[batch_size, seq_len]``."""
        if position < 0:
            raise ValueError(f"data position must be >= 0, got {position}")
        epoch, k = divmod(int(position), self.batches_per_epoch)
        return self._windows(self._order(epoch)[k * self.batch_size:(k + 1) * self.batch_size])

    def batch(self, position: int) -> np.ndarray:
        """This process's rows of the global batch at ``position``."""
        b = self.local_batch_size
        return self.global_batch(position)[self.process_index * b:(self.process_index + 1) * b]

    def iterate(self, start: int = 0, stop: Optional[int] = None):
        """``(position, local_batch)`` from ``start`` on."""
        p = start
        while stop is None or p < stop:
            yield p, self.batch(p)
            p += 1

    def all_windows(self, max_windows: Optional[int] = None) -> np.ndarray:
        """Every window in order (evaluation): ``[n, seq_len]``."""
        n = self.num_windows if max_windows is None else min(max_windows, self.num_windows)
        return self._windows(np.arange(n))


def split_tokens(tokens: np.ndarray, eval_fraction: float = D.EVAL_FRACTION) -> tuple:
    """``(train, eval)``: the last ``eval_fraction`` of the stream is held out."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    cut = int(len(tokens) * (1 - eval_fraction))
    return tokens[:cut], tokens[cut:]


@dataclasses.dataclass
class TextData:
    """A tokenised text source split into train and eval streams, with its tokenizer."""

    train: np.ndarray
    eval: np.ndarray
    tokenizer: object
    source: str = "embedded"
    #: windows open with this token (a pretrained model's BOS, as it was trained); None: plain stream cuts
    bos_token_id: Optional[int] = None

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary (for a raw token array: its largest id + 1)."""
        if self.tokenizer is None:
            return int(max(self.train.max(initial=0), self.eval.max(initial=0))) + 1
        return int(self.tokenizer.vocab_size)

    @property
    def tokenizer_source(self):
        """What ``load_tokenizer`` reloads this tokenizer from (``tokenizer.name_or_path``: the offline BPE's
        name, a checkpoint directory or a cached GGUF conversion), or None for a raw token array."""
        return None if self.tokenizer is None else str(self.tokenizer.name_or_path)

    def windows(self, window: int, max_windows: Optional[int] = None, split: str = "eval"):
        """``(ids[n, window], attention_mask, score_mask)``: whole windows of ``split`` in stream order (BOS first
        when the data opens with it), every token scored but the first: ``radial_jax.data.eval_windows``'s
        windows for data without BOS."""
        ids = self.dataset(window, 1, split=split).all_windows(max_windows)
        score = np.ones(ids.shape, bool)
        score[:, 0] = False
        return ids, np.ones(ids.shape, bool), score

    def dataset(self, seq_len: int, batch_size: int, seed: int = 0, split: str = "train", **kw) -> PackedDataset:
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        tokens = self.train if split == "train" else self.eval
        return PackedDataset(tokens, seq_len, batch_size, seed=seed, shuffle=(split == "train"),
                             bos_token_id=self.bos_token_id, **kw)


def text_data(source: Union[str, np.ndarray] = D.DATA, eval_fraction: float = D.EVAL_FRACTION,
              tokenizer=None, open_with_bos: bool = False) -> TextData:
    """Load, tokenise and split a text source (see the module docstring).

    ``open_with_bos``: every window of its datasets opens with the tokenizer's BOS token, as a pretrained
    model was trained (Gemma 3 without it: perplexity many times higher)."""
    bos = None
    if open_with_bos:
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            raise ValueError("open_with_bos needs a tokenizer with a BOS token (bos_token_id); this one has none")
    if isinstance(source, np.ndarray):
        train, ev = split_tokens(source, eval_fraction)
        return TextData(train, ev, tokenizer, "array", bos)
    if os.fspath(source) == "stdlib":  # held out by document (radial_jax.data.stdlib), not by stream position
        from radial_jax.data.corpus import offline_tokenizer
        tok = tokenizer or offline_tokenizer()
        return TextData(*_stdlib_streams(tok), tok, "stdlib", bos)
    docs, tok = load_text_source(os.fspath(source), tokenizer)
    tokens = tokenize(docs, tok)
    train, ev = split_tokens(tokens, eval_fraction)
    return TextData(train, ev, tok, os.fspath(source), bos)


_STDLIB_STREAMS: dict = {}  # the last tokenizer's (train, held-out) streams: tokenizing them takes seconds


def _stdlib_streams(tokenizer) -> tuple:
    """The stdlib source's training and held-out token streams (read-only), tokenised once per process for a
    named tokenizer (the offline BPE, a checkpoint's or a GGUF file's: the same name gives the same tokens)."""
    from radial_jax.data.stdlib import stdlib_split
    name = str(getattr(tokenizer, "name_or_path", "") or "")
    key = (name, int(tokenizer.vocab_size), D.STDLIB_HELD_OUT)
    if name and key in _STDLIB_STREAMS:
        return _STDLIB_STREAMS[key]
    streams = tuple(tokenize(docs, tokenizer) for docs in stdlib_split())
    for stream in streams:
        stream.setflags(write=False)
    if name:
        _STDLIB_STREAMS.clear()
        _STDLIB_STREAMS[key] = streams
    return streams


def model_text_data(source: Union[str, np.ndarray], model, eval_fraction: float = D.EVAL_FRACTION) -> TextData:
    """``source`` tokenised with ``model``'s own tokenizer (``model.tokenizer()``: refused when it has none), each
    window opened with its BOS when the model is a pretrained one that has a BOS (as it was trained); a model
    trained here with the offline BPE keeps the plain stream cuts it was trained on."""
    from radial_jax.data.corpus import OFFLINE_TOKENIZER_PREFIX
    tokenizer = model.tokenizer()
    trained_here = str(model.tokenizer_path).startswith(OFFLINE_TOKENIZER_PREFIX)
    bos = not trained_here and getattr(tokenizer, "bos_token_id", None) is not None
    return text_data(source, eval_fraction, tokenizer=tokenizer, open_with_bos=bos)
