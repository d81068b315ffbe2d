"""Chinese vocabulary extension: train / merge / stats (see cnllama_jax/tokenizer.py).

  python launch/build_tokenizer.py train --input corpus/ --vocab_size 20000 \
      --model_type unigram --character_coverage 0.9995 --out chinese_sp.model
  python launch/build_tokenizer.py merge --base llama_tokenizer.model \
      --add chinese_sp.model --out merged/ [--pad_piece "[PAD]"] [--new_piece_scores ordered]
  python launch/build_tokenizer.py stats --tokenizer llama_tokenizer.model \
      --tokenizer merged/ --text zh.txt --png stats.png

Byte-level BPE (LLaMA-3 style tokenizer.json) bases:
  python launch/build_tokenizer.py train --model_type bpe --input corpus/ --vocab_size 20000 \
      --out chinese_bpe.json
  python launch/build_tokenizer.py merge --base llama3/tokenizer.json --add chinese_bpe.json \
      --out merged_bpe/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
  from cnllama_jax import bpe, cli, paths, tokenizer as tk
  from cnllama_jax import tokenizer_stats as tstats
  from cnllama_jax.data import sources
except ImportError:  # running from a checkout without the package installed
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
  from cnllama_jax import bpe, cli, paths, tokenizer as tk
  from cnllama_jax import tokenizer_stats as tstats
  from cnllama_jax.data import sources


def _flag(parser: argparse.ArgumentParser, name: str, default: bool, help: str) -> None:
  parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=default,
                      help=help)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)

  train = sub.add_parser("train", help="train a SentencePiece model or a byte-level BPE")
  train.add_argument("--input", nargs="+", required=True, help="UTF-8 text files or directories")
  train.add_argument("--out", required=True,
                     help="output .model path (SentencePiece) or, with --model_type bpe, a .json "
                     "path for a byte-level BPE tokenizer.json (tokenizers)")
  train.add_argument("--vocab_size", type=int, default=20000)
  train.add_argument("--model_type", choices=["unigram", "bpe"], default="unigram",
                     help="unigram: SentencePiece (paper); bpe: SentencePiece BPE (LLaMA-style "
                     "base), or byte-level BPE when --out ends in .json")
  train.add_argument("--min_frequency", type=int, default=2, help="bpe: least pair count to merge")
  train.add_argument("--character_coverage", type=float, default=0.9995)
  train.add_argument("--normalization", default="nmt_nfkc",
                     help="nmt_nfkc (paper) or identity (LLaMA)")
  train.add_argument("--input_sentence_size", type=int, default=0,
                     help="sample this many lines (0: all)")
  train.add_argument("--num_threads", type=int, default=None)
  _flag(train, "byte_fallback", False, "add <0x00>..<0xFF> byte pieces")
  _flag(train, "split_digits", False, "split numbers into single digits")
  _flag(train, "add_dummy_prefix", True, "prepend a whitespace to the text")
  _flag(train, "remove_extra_whitespaces", True, "collapse runs of whitespace")
  _flag(train, "allow_whitespace_only_pieces", False, "allow pieces made only of whitespace")
  _flag(train, "hard_vocab_limit", True, "fail if the vocabulary cannot reach --vocab_size")

  merge = sub.add_parser("merge", help="extend a base (LLaMA) model with the pieces of another")
  merge.add_argument("--base", required=True,
                     help="base .model (LLaMA) or byte-level BPE tokenizer.json (file or dir)")
  merge.add_argument("--add", required=True,
                     help=".model or (for a byte-level BPE base) a byte-level BPE tokenizer.json "
                     "whose new pieces are appended")
  merge.add_argument("--out", required=True, help="new output directory")
  merge.add_argument("--pad_piece", default=None,
                     help='append a pad piece last, e.g. "[PAD]" (Alpaca)')
  merge.add_argument("--pad_type", choices=sorted(tk.PAD_TYPES), default="normal",
                     help="normal: as the published Chinese-Alpaca file; user_defined: "
                     "sentencepiece maps the literal pad string to its id, as HF does")
  merge.add_argument("--new_piece_scores", choices=tk.SCORE_MODES, default="zero",
                     help="zero: paper; ordered: distinct decreasing scores (HF == sentencepiece)")

  stats = sub.add_parser("stats", help="compare tokenizers on a text")
  stats.add_argument("--tokenizer", action="append", required=True,
                     help=".model, tokenizer.json or a directory holding one")
  stats.add_argument("--text", required=True, help="UTF-8 text file")
  stats.add_argument("--png", default=None, help="save a bar chart here")
  stats.add_argument("--min_seconds", type=float, default=0.5,
                     help="time budget per speed measurement")
  return parser


def run(args: argparse.Namespace) -> None:
  if args.command == "train" and args.model_type == "bpe" and args.out.endswith(".json"):
    bpe.train(args.input, args.out, vocab_size=args.vocab_size,
              min_frequency=args.min_frequency, progress=True)
    print(f"wrote {args.out}")
  elif args.command == "train":
    tk.train_sentencepiece(
        args.input, args.out, vocab_size=args.vocab_size, model_type=args.model_type,
        character_coverage=args.character_coverage, byte_fallback=args.byte_fallback,
        split_digits=args.split_digits, normalization=args.normalization,
        add_dummy_prefix=args.add_dummy_prefix,
        remove_extra_whitespaces=args.remove_extra_whitespaces,
        allow_whitespace_only_pieces=args.allow_whitespace_only_pieces,
        hard_vocab_limit=args.hard_vocab_limit, input_sentence_size=args.input_sentence_size,
        num_threads=args.num_threads, progress=True,
    )
    print(f"wrote {args.out}")
  elif args.command == "merge":
    result = tk.merge(args.base, args.add, args.out, pad_piece=args.pad_piece,
                      new_piece_scores=args.new_piece_scores, pad_type=args.pad_type)
    pad = f", pad id {result.pad_id}" if result.pad_id is not None else ""
    print(f"wrote {result.out_dir}: {result.num_pieces} pieces "
          f"({result.num_base} base + {result.num_added} appended{pad})")
  else:
    text = "\n".join(line for _, line, _ in sources.iter_lines(args.text))
    results = []
    for path in args.tokenizer:
      p = paths.path(path)
      name = p.name if p.is_dir() else p.stem
      name += " (bpe)" if tk.base_kind(path) == "bpe" else ""
      results.append(tstats.tokenizer_stats(tk.load(path), text, name=name,
                                            min_seconds=args.min_seconds))
    print(tstats.format_stats_table(results))
    if args.png:
      print(f"wrote {tstats.plot_stats(results, args.png)}")


def main(argv: list[str] | None = None) -> int:
  return cli.run_reporting_errors(run, build_parser().parse_args(argv))


if __name__ == "__main__":
  sys.exit(main())
