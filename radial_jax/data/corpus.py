"""Text sources: the embedded offline corpus, WikiText-2 raw from the hub, local files; an offline tokenizer.

(The standard library as real text, split by document, is ``radial_jax.data.stdlib``.)

* ``embedded_corpus()``: Python's own documentation topics (``pydoc_data.topics``,
  shipped with every CPython), about 465k characters of English technical
  prose: the offline default, needs no download.
* ``offline_tokenizer(vocab_size)``: a byte-level BPE trained deterministically
  on that corpus with the ``tokenizers`` library, cached under
  ``~/.cache/radial_jax/tokenizers`` and returned as a transformers
  ``PreTrainedTokenizerFast`` with OPT's special ids (``<s>``=0, ``<pad>``=1,
  ``</s>``=2 used as BOS and EOS, ``<unk>``=3).
* ``wikitext2(split)``: WikiText-2 raw (``Salesforce/wikitext``,
  ``wikitext-2-raw-v1``) from the hub's parquet files through huggingface_hub
  (its cache and ``HF_HUB_OFFLINE`` are honoured); ``repo_dir=`` reads a local
  copy in hub layout instead.
* ``perplexity_windows``: the usual WikiText-2 evaluation windows.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np

WIKITEXT_REPO = "Salesforce/wikitext"
WIKITEXT_FILES = {split: f"wikitext-2-raw-v1/{split}-00000-of-00001.parquet" for split in ("train", "validation", "test")}
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0..3, OPT's convention
CACHE_DIR = Path(os.environ.get("RADIAL_JAX_CACHE", Path.home() / ".cache" / "radial_jax"))
#: ``offline_tokenizer(N)``'s name: what a model trained with it records as its tokenizer (``load_tokenizer``)
OFFLINE_TOKENIZER_PREFIX = "offline-pydoc-bpe-"


def embedded_corpus() -> List[str]:
    """Documents of the offline corpus: one per pydoc topic, in sorted topic order."""
    from pydoc_data.topics import topics
    return [topics[name].strip() for name in sorted(topics) if topics[name].strip()]


def offline_tokenizer(vocab_size: int = 2048):
    """A byte-level BPE trained on ``embedded_corpus()`` (deterministic; cached)."""
    if not 260 <= vocab_size <= 65536:
        raise ValueError(f"vocab_size must be in [260, 65536] (256 bytes + 4 specials at least), got {vocab_size}")
    from transformers import PreTrainedTokenizerFast
    path = CACHE_DIR / "tokenizers" / f"pydoc-bpe-{vocab_size}" / "tokenizer.json"
    if not path.exists():
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(embedded_corpus(), trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            f.write(tok.to_str())
        os.replace(f.name, path)  # atomic: a half-written tokenizer is never read
    return PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="</s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>",
                                   name_or_path=f"{OFFLINE_TOKENIZER_PREFIX}{vocab_size}")


def wikitext2(split: str = "test", *, repo_dir: Optional[Union[str, Path]] = None) -> List[str]:
    """WikiText-2 raw lines of ``split`` (empty lines kept out), from the hub or a local hub-layout copy."""
    if split not in WIKITEXT_FILES:
        raise ValueError(f"WikiText-2 split {split!r} is unknown; allowed: {sorted(WIKITEXT_FILES)}")
    if repo_dir is not None:
        path = Path(repo_dir) / WIKITEXT_FILES[split]
        if not path.exists():
            raise ValueError(f"no WikiText-2 parquet file at {path}")
    else:
        from huggingface_hub import hf_hub_download
        try:
            path = hf_hub_download(WIKITEXT_REPO, WIKITEXT_FILES[split], repo_type="dataset")
        except Exception as e:
            raise ValueError(f"could not get WikiText-2 from the hub ({type(e).__name__}: {e}); "
                             "check the network, or the cache when HF_HUB_OFFLINE=1, or pass repo_dir=") from e
    import pyarrow.parquet as pq
    lines = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    return ["".join(lines)]  # the usual evaluation joins the split into one text


def read_text_files(path: Union[str, Path]) -> List[str]:
    """A ``.txt`` file, or every ``.txt`` file under a directory (sorted), as documents."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(p.rglob("*.txt")) if p.is_dir() else []
    if not files:
        raise ValueError(f"no text at {path!s}: give a .txt file or a directory holding .txt files")
    documents = []
    for f in files:
        try:
            documents.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{f} is not UTF-8 text ({e.reason} at byte {e.start}); give text files only") from None
    return documents


def load_text_source(source: str = "embedded", tokenizer=None):
    """``(documents, tokenizer)`` to evaluate on: ``"embedded"``, ``"wikitext2"`` (test split), ``"stdlib"``
    (its held-out documents, ``radial_jax.data.stdlib``), or a file/directory.

    The tokenizer defaults to ``offline_tokenizer()``; pass the model's own for a real checkpoint.
    """
    if source == "embedded":
        return embedded_corpus(), tokenizer or offline_tokenizer()
    if source in ("wikitext2", "wikitext-2"):
        return wikitext2("test"), tokenizer or offline_tokenizer()
    if source == "stdlib":
        from radial_jax.data.stdlib import stdlib_split
        return stdlib_split()[1], tokenizer or offline_tokenizer()
    return read_text_files(source), tokenizer or offline_tokenizer()


def tokenize(documents: Sequence[str], tokenizer, chunk: int = 256) -> np.ndarray:
    """One token stream, documents separated by EOS (no BOS: windows add their own). Documents go to the
    tokenizer ``chunk`` at a time: a fast tokenizer encodes a list in parallel (about twice as fast here)."""
    eos = np.asarray([tokenizer.eos_token_id], np.int32)
    pieces: List[np.ndarray] = []
    for start in range(0, len(documents), chunk):
        for ids in tokenizer(list(documents[start:start + chunk]), add_special_tokens=False)["input_ids"]:
            pieces += [np.asarray(ids, np.int32), eos]
    return np.concatenate(pieces) if pieces else np.zeros((0,), np.int32)


def perplexity_windows(tokens: np.ndarray, window: int, stride: Optional[int] = None):
    """Sliding windows as in the usual WikiText-2 evaluation (transformers' perplexity guide).

    Window ``i`` covers ``tokens[begin : begin + window]`` with ``begin = i * stride``;
    only its last ``end - previous_end`` tokens are scored, so every token is
    predicted once, with up to ``window - stride`` tokens of context before it.
    A window's first token is never scored (nothing in the window predicts it):
    the stream's first token, and with ``stride == window`` the first of each
    window, exactly as the shifted loss of the usual evaluation drops them. Returns ``(ids[n, window],
    attention_mask[n, window], score_mask[n, window])``; the last window is
    right-padded.
    """
    tokens = np.asarray(tokens)
    stride = window if stride is None else stride
    if not 0 < stride <= window:
        raise ValueError(f"need 0 < stride <= window, got stride={stride}, window={window}")
    if len(tokens) < 2:
        raise ValueError(f"the text has {len(tokens)} tokens; at least 2 are needed to score anything")
    ids, attn, score = [], [], []
    prev_end = 0
    for begin in range(0, len(tokens), stride):
        end = min(begin + window, len(tokens))
        chunk = tokens[begin:end]
        row = np.full(window, 1, np.int32)
        row[:len(chunk)] = chunk
        m = np.zeros(window, bool)
        m[:len(chunk)] = True
        s = np.zeros(window, bool)
        new = end - max(prev_end, begin + 1)  # tokens scored here (the stream's first one never is)
        s[len(chunk) - new:len(chunk)] = True
        s[0] = False
        ids.append(row), attn.append(m), score.append(s)
        prev_end = end
        if end == len(tokens):
            break
    return np.stack(ids), np.stack(attn), np.stack(score)


def eval_windows(tokens: np.ndarray, window: int, max_windows: Optional[int] = None):
    """Whole non-overlapping evaluation windows: ``perplexity_windows(tokens, window, window)`` without
    its right-padded last window, at most ``max_windows`` of them.

    The one window set of the pipeline's profile, oracle simulation and evaluation, so they score the
    same tokens (every token of a window but its first) and report the same teacher perplexity.
    Returns ``(ids[n, window], attention_mask[n, window], score_mask[n, window])``.
    """
    ids, mask, score = perplexity_windows(tokens, window, window)
    whole = mask.all(1)
    if not whole.any():
        raise ValueError(f"the text has {len(tokens)} tokens, fewer than one window of {window}; "
                         "use a smaller window or more text")
    n = None if max_windows is None else int(max_windows)
    return ids[whole][:n], mask[whole][:n], score[whole][:n]


def window_batches(arrays, batch_size: int, whole_only: bool = False) -> list:
    """``[(a[i:i + batch_size], b[i:i + batch_size], ...)]`` over a tuple of aligned arrays, or the batches of
    one array. The last batch may be smaller (one more compile, every window scored), or with ``whole_only``
    is left out (one shape, one compile). A batch size below 1, or no batch at all, is a ``ValueError``."""
    single = not isinstance(arrays, (tuple, list))
    n = len(arrays) if single else len(arrays[0])
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    end = n - n % batch_size if whole_only else n
    if end < 1:
        raise ValueError(f"{n} windows make no {'whole ' if whole_only else ''}batch of {batch_size}")
    if single:
        return [arrays[i:i + batch_size] for i in range(0, end, batch_size)]
    return [tuple(a[i:i + batch_size] for a in arrays) for i in range(0, end, batch_size)]
