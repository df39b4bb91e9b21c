"""Data sources: text (embedded offline corpus, WikiText-2, local files) and images (folders, COCO)."""
from radial_jax.data.corpus import (embedded_corpus, load_text_source, offline_tokenizer, perplexity_windows,
                                    read_text_files, tokenize, wikitext2)
from radial_jax.data.images import coco_validation, image_folder, preprocess

__all__ = ["embedded_corpus", "load_text_source", "offline_tokenizer", "perplexity_windows", "read_text_files",
           "tokenize", "wikitext2", "coco_validation", "image_folder", "preprocess"]
