"""Data sources: text (embedded offline corpus, WikiText-2, local files) and images (folders, COCO)."""
from radial_jax.data.corpus import (embedded_corpus, eval_windows, load_text_source, offline_tokenizer,
                                    perplexity_windows, read_text_files, tokenize, wikitext2, window_batches)
from radial_jax.data.images import coco_validation, image_folder, preprocess

__all__ = ["embedded_corpus", "eval_windows", "window_batches", "load_text_source", "offline_tokenizer", "perplexity_windows", "read_text_files",
           "tokenize", "wikitext2", "coco_validation", "image_folder", "preprocess"]
