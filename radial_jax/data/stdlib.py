"""Real text that needs no network: what every CPython installation ships (the ``"stdlib"`` source).

Not WikiText: it is Python's own documentation and source code, English technical prose mixed with
code. Its documents are

* every topic of ``pydoc_data.topics`` (the language reference sections ``help()`` shows), named
  ``topic/<name>``;
* every ``.py`` file of the standard library, docstrings and comments included, named by its path
  under the library (``source/json/decoder.py``). Test suites (``test``, ``tests``, ``idle_test``),
  ``site-packages``, ``lib2to3`` (grammar fixtures) and files over ``MAX_FILE_BYTES`` (generated
  tables) are left out.

Train and held-out text are split **by document**, so no held-out file shares a line with training
text through a window cut: a document is held out when the first 8 bytes of the SHA-1 of its name,
read as a number in [0, 1), fall below ``held_out_fraction``. The split depends only on the names,
not on their order or on which other files this Python ships; its sizes depend on the Python
version (CPython 3.11: 736 documents, about 11.5 MB; with Gemma 3's tokenizer about 3.1M training and
0.17M held-out tokens at the default 5 %).
"""
from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path
from typing import List, Tuple

from radial_jax import defaults as D

#: folders of the standard library that are not its documentation or sources
EXCLUDED_PARTS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "lib2to3",
                            "__pycache__"})
#: larger files are generated tables (``unicodedata`` names, encodings), not prose or code people write
MAX_FILE_BYTES = 400_000


def stdlib_root() -> Path:
    """The folder of this interpreter's standard library (``sysconfig``'s ``stdlib`` path)."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_documents() -> List[Tuple[str, str]]:
    """``[(name, text)]`` of every document, sorted by name (see the module docstring)."""
    from pydoc_data.topics import topics
    docs = [(f"topic/{name}", text.strip()) for name, text in topics.items() if text.strip()]
    root = stdlib_root()
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if EXCLUDED_PARTS & set(rel.parts) or path.stat().st_size > MAX_FILE_BYTES:
            continue
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            docs.append((f"source/{rel.as_posix()}", text))
    if len(docs) < 100:
        raise ValueError(f"found {len(docs)} documents of the standard library under {root}; this Python seems to "
                         "ship without its sources (a stripped install): use --data embedded or text files")
    return sorted(docs)


def is_held_out(name: str, held_out_fraction: float) -> bool:
    """Whether document ``name`` is held out: its SHA-1's first 8 bytes, as a fraction, < ``held_out_fraction``."""
    digest = hashlib.sha1(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64 < held_out_fraction


def stdlib_split(held_out_fraction: float = D.STDLIB_HELD_OUT) -> Tuple[List[str], List[str]]:
    """``(train_texts, held_out_texts)``, split by document name (see the module docstring)."""
    if not 0 < held_out_fraction < 1:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    train, held = [], []
    for name, text in stdlib_documents():
        (held if is_held_out(name, held_out_fraction) else train).append(text)
    return train, held
