"""The ``allocmoe.*`` GGUF keys and format versions.

Keys (format version 1). The standard ``<arch>.expert_used_count`` keeps the original
scalar, so a stock llama.cpp still runs a stamped file correctly at full budget.

* ``allocmoe.version`` u32, ``allocmoe.enabled`` bool (kv_override it to false for full budget)
* ``allocmoe.layer_expert_counts`` u32[block_count]: the default plan (non-MoE blocks carry K_orig)
* ``allocmoe.budget`` f32 (fraction), ``allocmoe.budget_count`` u32: the default plan's budget
* ``allocmoe.token_k_min`` / ``allocmoe.token_k_max`` u32: Alloc-T bounds (k_max 0 = Alloc-T off)
* ``allocmoe.plan_count`` u32, ``allocmoe.plan_default`` u32 and, per stored plan i,
  ``allocmoe.plan.<i>.{layer_expert_counts,budget,budget_count,method,name}``; the patched
  loader uses plan i when the scalar kv_override ``allocmoe.plan_index=int:i`` is given
* provenance strings: ``allocmoe.tool``, ``allocmoe.source``, ``allocmoe.calibration``

Format version 2 adds Alloc-T's decode rule: per plan ``allocmoe.plan.<i>.token_thresholds``
f32[block_count] (and ``allocmoe.token_thresholds`` for the default plan), one routing-score
threshold per block (ignored where a block's count is k_min or k_max, or it has no experts), and
``allocmoe.token_mode`` (string): "batch" (the batch rule for ubatches of T > 1 tokens, top-k_l
at T = 1), "decode" (the decode rule for every ubatch) or "both" (the decode rule at T = 1, the
batch rule above). Files without thresholds stay version 1.

The decode rule's budget controller (patch series 6) reads two optional keys, also scalar
kv_overrides: ``allocmoe.decode_control`` bool (on by default wherever the decode rule runs) and
``allocmoe.decode_window`` u32 (tokens, 64 by default, 1 to 65536): the window over which it holds
each layer's mean count at the plan's. Older runtimes ignore them (and run uncontrolled thresholds).

The per-token rules of the field (patch series 7) replace Alloc-T where ``allocmoe.token_rule`` (string) says
"ser" or "top_p"; they need no plan, so they are kv_overrides on any MoE file (`runtime.LoadChoice`):
``allocmoe.token_rule_value`` f32 (SER's fraction t of the top weight in [0, 1], top-p's mass p in (0, 1]) and
``allocmoe.token_rule_k_min`` u32 (1 by default). "alloc_t", the default, is Alloc-T's rules as above.
"""

from __future__ import annotations

FORMAT_VERSION = 1
FORMAT_VERSION_THRESHOLDS = 2


class Keys:
    """The ``allocmoe.*`` GGUF keys in one place, as gguf-py's ``gguf.Keys`` names the standard ones.

    The ``PLAN_*`` keys of stored plan i are templates: ``Keys.PLAN_BUDGET.format(index=i)``."""

    PREFIX = "allocmoe."
    VERSION = "allocmoe.version"
    ENABLED = "allocmoe.enabled"
    LAYER_EXPERT_COUNTS = "allocmoe.layer_expert_counts"  # the default plan
    BUDGET = "allocmoe.budget"
    BUDGET_COUNT = "allocmoe.budget_count"
    TOKEN_K_MIN = "allocmoe.token_k_min"
    TOKEN_K_MAX = "allocmoe.token_k_max"
    TOKEN_MODE = "allocmoe.token_mode"
    TOKEN_THRESHOLDS = "allocmoe.token_thresholds"
    DECODE_CONTROL = "allocmoe.decode_control"
    DECODE_WINDOW = "allocmoe.decode_window"
    TOKEN_RULE = "allocmoe.token_rule"
    TOKEN_RULE_VALUE = "allocmoe.token_rule_value"
    TOKEN_RULE_K_MIN = "allocmoe.token_rule_k_min"
    PLAN_COUNT = "allocmoe.plan_count"
    PLAN_DEFAULT = "allocmoe.plan_default"
    PLAN_INDEX = "allocmoe.plan_index"  # only as a kv_override: the stored plan to run
    TOOL = "allocmoe.tool"
    SOURCE = "allocmoe.source"
    CALIBRATION = "allocmoe.calibration"
    OUTTYPE = "allocmoe.outtype"
    SYNTHETIC = "allocmoe.synthetic"  # set by `synth`: random weights
    PLAN_PREFIX = "allocmoe.plan."
    PLAN_LAYER_EXPERT_COUNTS = "allocmoe.plan.{index}.layer_expert_counts"
    PLAN_TOKEN_THRESHOLDS = "allocmoe.plan.{index}.token_thresholds"
    PLAN_BUDGET = "allocmoe.plan.{index}.budget"
    PLAN_BUDGET_COUNT = "allocmoe.plan.{index}.budget_count"
    PLAN_METHOD = "allocmoe.plan.{index}.method"
    PLAN_NAME = "allocmoe.plan.{index}.name"
