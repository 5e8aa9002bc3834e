"""Entry point of the converter subprocess: llama.cpp's converter (pinned sdist, on sys.path) with one optional hook.

``python -m allocmoe_edge.converter_subprocess [--pre-tokenizer NAME] -- CONVERTER ARGS``: with
``--pre-tokenizer``, a BPE tokenizer whose pre-tokenizer hash the converter does not know is
written with NAME as ``tokenizer.ggml.pre`` instead of failing; known hashes are untouched.
"""

from __future__ import annotations

import logging
import sys


def main(argv: list[str]) -> None:
    """Parse our flag, install the hook, hand the rest to the converter's main()."""
    pre = None
    if argv[:1] == ["--pre-tokenizer"]:
        pre, argv = argv[1], argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    import convert_hf_to_gguf
    from conversion import base

    if pre is not None:
        original = base.TextModel.get_vocab_base_pre

        def get_vocab_base_pre(self, tokenizer) -> str:
            try:
                return original(self, tokenizer)
            except NotImplementedError:
                logging.getLogger("allocmoe").warning("unknown BPE pre-tokenizer: writing %r as asked", pre)
                return pre

        base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = ["convert_hf_to_gguf.py", *argv]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main(sys.argv[1:])
