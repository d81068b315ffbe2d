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
import importlib

_HOMES = {  # public name -> the module that defines it, imported on first use (PEP 562), so that
  # importing one light module (e.g. `encode` for IGNORE_INDEX) does not import tfds
  "build_pretrain_dataset": "datasets", "build_sft_dataset": "datasets", "load_built": "datasets",
  "IGNORE_INDEX": "encode", "PROMPT_TEMPLATE": "encode", "build_prompt": "encode",
  "encode_sft_example": "encode", "pack_row": "encode", "split_indices": "encode",
  "Loader": "loader", "collate": "loader", "epoch_permutation": "loader",
  "measure_throughput": "loader", "best_fit_decreasing": "packing",
  "document_segments": "packing", "iter_documents": "sources",
  "iter_instruction_records": "sources", "read_instructions": "sources",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
  if name not in _HOMES:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(_HOMES))
