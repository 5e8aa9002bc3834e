"""allocmoe-edge: budget-aware expert activation (Alloc-MoE) for MoE LLMs on llama.cpp."""

__version__ = "0.1.0"
