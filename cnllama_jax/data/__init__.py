"""Data pipelines: tfds builds of local corpora and a (seed, step)-pure loader.

  build_pretrain_dataset(files_or_dir, tokenizer_path, data_dir, block_size=512, val_fraction=0.01)
  build_sft_dataset(json_path_or_dir, tokenizer_path, data_dir, max_seq_len=512, *, pad_id, val_fraction=0.01)
      -> {"train": source, "validation": source | None, "stats": dict, "path": str}
  Loader(source, global_batch_size, seed, process_index=0, process_count=1).batch(step)
      -> {"input_ids", "labels", "attention_mask"}: int32 [global_batch / process_count, length]

Modules: ``sources`` (files, UTF-8 lines, JSON records and their errors), ``encode`` (prompt,
SFT label masking, packing, splits), ``staging`` (tokenise + validate before writing),
``builders`` (tfds builders, fingerprints), ``datasets`` (build-or-reuse), ``loader``.
"""
from cnllama_jax.data.datasets import build_pretrain_dataset, build_sft_dataset, load_built
from cnllama_jax.data.encode import (IGNORE_INDEX, PROMPT_TEMPLATE, build_prompt, encode_sft_example,
                                     load_tokenizer, pack_blocks, split_indices)
from cnllama_jax.data.loader import Loader, collate, epoch_permutation, measure_throughput

__all__ = [
    "IGNORE_INDEX", "PROMPT_TEMPLATE", "Loader", "build_pretrain_dataset", "build_prompt",
    "build_sft_dataset", "collate", "encode_sft_example", "epoch_permutation", "load_built",
    "load_tokenizer", "measure_throughput", "pack_blocks", "split_indices",
]
