"""Data pipelines: tfds builds of corpora (local or gs://), packing, and a (seed, step)-pure loader.

  build_pretrain_dataset(files_or_dir, tokenizer_path, data_dir, block_size=512, val_fraction=0.01,
                         *, pack=False)
  build_sft_dataset(json_path_or_dir, tokenizer_path, data_dir, max_seq_len=512, *, pad_id,
                    pack=False, val_fraction=0.01)
      -> {"train": source, "validation": source | None, "stats": dict, "path": str}
  Loader(source, global_batch_size, seed, process_index=0, process_count=1).batch(step)
      -> {"input_ids", "labels", "attention_mask"}: int32 [global_batch / process_count, length]
  iter_documents(files), read_instructions(path): the project's readers of text and prompts.

`attention_mask` holds segment ids (0 = padding, 1, 2, ... = the example a token belongs to); an
unpacked row is the one-segment case. Tokenizers are opened with `text_tokenizer.load` (a
SentencePiece `.model`, a byte-level BPE `tokenizer.json`, or a directory holding one).

Modules: `sources` (files, UTF-8 lines, documents, JSON records and their errors), `encode`
(prompt, SFT label masking, rows, splits), `packing` (which examples share a row, segment ids),
`text_tokenizer` (either tokenizer kind behind one interface), `staging` (tokenise + validate
before writing), `builders` (tfds builders, fingerprints),
`datasets` (build-or-reuse), `loader`.
"""
from cnllama_jax.data.datasets import build_pretrain_dataset, build_sft_dataset, load_built
from cnllama_jax.data.encode import (IGNORE_INDEX, PROMPT_TEMPLATE, build_prompt,
                                     encode_sft_example, pack_row, split_indices)
from cnllama_jax.data.loader import Loader, collate, epoch_permutation, measure_throughput
from cnllama_jax.data.packing import best_fit_decreasing, document_segments
from cnllama_jax.data.sources import iter_documents, iter_instruction_records, read_instructions

__all__ = [
    "IGNORE_INDEX", "PROMPT_TEMPLATE", "Loader", "best_fit_decreasing", "build_pretrain_dataset",
    "build_prompt", "build_sft_dataset", "collate", "document_segments", "encode_sft_example",
    "epoch_permutation", "iter_documents", "iter_instruction_records", "load_built",
    "measure_throughput", "pack_row", "read_instructions", "split_indices",
]
