"""The tokenizer a bundle names (checkpoint directory, GGUF file or the offline BPE), with no network."""
from __future__ import annotations

import os
from pathlib import Path

from radial_jax.data import corpus  # corpus.CACHE_DIR read at call time: one setting for every cache
from radial_jax.data.corpus import OFFLINE_TOKENIZER_PREFIX, offline_tokenizer

#: files a directory holds when it has a tokenizer (any one of them is enough for ``AutoTokenizer``)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(source):
    """The tokenizer that ``source`` names, with no network and no substitute.

    ``source`` is what a bundle's ``tokenizer_path`` holds: a checkpoint directory with tokenizer files
    (``TOKENIZER_FILES``), a ``.gguf`` file (transformers builds the tokenizer from its metadata, which
    takes about 20 s for Gemma's 262k-token vocabulary, so it is converted once and cached under
    ``radial_jax.data.corpus.CACHE_DIR``), or ``offline-pydoc-bpe-N`` (the offline BPE a model trained
    here used, ``radial_jax.data.offline_tokenizer``). Anything else raises a ``ValueError`` that says what
    was found and what is allowed. transformers' warning that PyTorch was not found is silenced: a
    tokenizer needs no torch.
    """
    import logging
    from transformers.utils import logging as hf_logging
    text = str(source)
    if text.startswith(OFFLINE_TOKENIZER_PREFIX):
        size = text[len(OFFLINE_TOKENIZER_PREFIX):]
        if not size.isdigit():
            raise ValueError(f"tokenizer {text!r}: expected {OFFLINE_TOKENIZER_PREFIX}N with N the vocabulary size")
        return offline_tokenizer(int(size))
    path = Path(os.path.expanduser(text))
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity(logging.ERROR)
    try:
        if path.suffix == ".gguf":
            return _gguf_tokenizer(path)
        if not path.is_dir() or not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise ValueError(f"{path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); give a checkpoint "
                             f"directory with its tokenizer files, a .gguf file, or {OFFLINE_TOKENIZER_PREFIX}N")
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(path))
    finally:
        hf_logging.set_verbosity(previous)


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers give the same ids and special tokens on a probe text (a cache's round trip)."""
    probe = "The for statement, def f(x):\n    return x ** 2  # 3.14 café\t<b>"
    specials = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
    return (len(a) == len(b) and a.encode(probe) == b.encode(probe)
            and all(getattr(a, k, None) == getattr(b, k, None) for k in specials))


def _gguf_tokenizer(path: Path):
    """transformers' tokenizer of a GGUF file, converted once and cached by the file's name, size and mtime."""
    from transformers import AutoTokenizer
    if not path.is_file():
        raise ValueError(f"{path}: no such GGUF file, so no tokenizer")
    stat = path.stat()
    cached = corpus.CACHE_DIR / "tokenizers" / f"gguf-{path.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    if (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached))
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except ImportError as e:  # transformers' GGUF reader imports torch (and gguf) lazily
        raise ImportError(f"reading the tokenizer of {path.name} needs torch (transformers' GGUF reader imports it; "
                          f"{e}): pip install 'radial_jax[torch]'") from e
    import shutil
    import tempfile
    cached.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".staging-"))
    try:
        tok.save_pretrained(str(staging))
        saved = AutoTokenizer.from_pretrained(str(staging))
        if not same_tokenizer(tok, saved):
            raise ValueError("the saved copy tokenises differently")
    except Exception:  # noqa: BLE001 - some conversions do not survive save_pretrained: use them uncached
        shutil.rmtree(staging, ignore_errors=True)
        tok.name_or_path = str(path)  # what load_tokenizer reloads it from
        return tok
    try:
        os.replace(staging, cached)  # atomic: a half-written tokenizer is never read
    except OSError:  # another process cached it first
        shutil.rmtree(staging, ignore_errors=True)
    saved.name_or_path = str(cached)  # the checked copy, named by its cache folder: reloadable without torch
    return saved
