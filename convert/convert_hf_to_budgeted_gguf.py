#!/usr/bin/env python3
"""Convert a Hugging Face MoE checkpoint to one GGUF that carries Alloc-MoE budget plans.

In the spirit of llama.cpp's convert_hf_to_gguf.py (same --outfile / --outtype names), but the
work is done by allocmoe_edge.convert.build_budgeted_gguf: the plans (plan.json files from
`allocmoe allocate`) are checked against the checkpoint, llama.cpp's own converter from the
pinned llama-cpp-python sdist writes the GGUF, llama.cpp's quantizer makes k-quants, and every
plan is stamped into the allocmoe.* metadata. The standard <arch>.expert_used_count keeps its
value, so stock llama.cpp runs the file at full budget; the patched runtime runs the default
plan, or another picked with the scalar kv override allocmoe.plan_index=int:N.

Example:
  python convert/convert_hf_to_budgeted_gguf.py ~/models/OLMoE-1B-7B-0924 \\
      --plan plan-25.json --plan plan-50.json --default-plan 1 --outtype q4_k_m \\
      --outfile olmoe.budget.gguf
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if (ROOT / "allocmoe_edge").is_dir():  # run from a checkout: use its package
    sys.path.insert(0, str(ROOT))

from allocmoe_edge.convert import OUT_TYPES, build_budgeted_gguf  # noqa: E402
from allocmoe_edge.errors import AllocMoeError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with llama.cpp's converter names where they exist."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run a plan: allocmoe run FILE --budget 0.5, or any llama-cpp-python program built by "
               "`allocmoe build-runtime` with kv_overrides={'allocmoe.plan_index': N}.")
    parser.add_argument("model", type=Path, help="Hugging Face model directory (config.json, safetensors, tokenizer)")
    parser.add_argument("--plan", action="append", required=True, metavar="PLAN_JSON",
                        help="plan.json from `allocmoe allocate`; repeat it to store several budgets in one file")
    parser.add_argument("--default-plan", type=int, default=0, metavar="N",
                        help="index of the plan the file runs when none is chosen (default: 0)")
    parser.add_argument("--outfile", type=Path, required=True, help="GGUF to write (atomically)")
    parser.add_argument("--outtype", choices=OUT_TYPES, default="q8_0",
                        help="weight type; k-quants go through llama.cpp's quantizer (default: q8_0)")
    parser.add_argument("--pre-tokenizer", metavar="NAME",
                        help="llama.cpp name of the BPE pre-tokenizer, used only if the converter does not know the "
                             "model's (for example gpt-2, llama-bpe, qwen2)")
    parser.add_argument("--force", action="store_true", help="overwrite --outfile if it exists")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Convert and stamp; expected errors are one line on stderr and exit status 1."""
    args = parse_args(argv)
    if args.outfile.exists() and not args.force:
        print(f"error: {args.outfile} exists; pass --force to overwrite it", file=sys.stderr)
        return 1
    log = lambda message: print(message, file=sys.stderr)  # noqa: E731
    try:
        build_budgeted_gguf(args.model, args.plan, args.outfile, args.outtype, args.default_plan, args.pre_tokenizer,
                            log=log)
    except AllocMoeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.outfile}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
