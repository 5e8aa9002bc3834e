"""Small GGUF files written directly with gguf-py, for metadata tests that need no model."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np


def write_fake_moe(path: Path, n_layer: int = 4, n_expert: int = 8, k: int = 2, dense_first: bool = False) -> Path:
    """A header-complete GGUF of a MoE shape: router tensors mark the MoE blocks."""
    w = gguf.GGUFWriter(path, "qwen2moe")
    w.add_block_count(n_layer)
    w.add_expert_count(n_expert)
    w.add_expert_used_count(k)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for i in range(n_layer):
        if dense_first and i == 0:
            w.add_tensor(f"blk.{i}.ffn_up.weight", np.zeros((4, 4), dtype=np.float32))
        else:
            w.add_tensor(f"blk.{i}.ffn_gate_inp.weight", np.full((n_expert, 4), i, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
