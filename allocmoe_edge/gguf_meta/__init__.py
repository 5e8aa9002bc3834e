"""The ``allocmoe.*`` GGUF metadata: read a model's MoE shape and plans, validate, stamp a copy.

Split as gguf-py splits itself: `keys` (the keys and format versions, documented there),
`reader` (`read_info`: a file's shape and typed metadata), `plans` (stored plans against a file's
shape) and `writer` (key/values packed into an atomic copy). Import from the package.
"""

from .keys import FORMAT_VERSION, FORMAT_VERSION_THRESHOLDS, Keys
from .plans import (
    check_stored_plan,
    expand_counts,
    find_plan,
    plan_for_counts,
    plan_shape,
    stored_plan,
    stored_plan_from_file,
)
from .reader import AllocmoeMeta, GgufModelInfo, StoredPlan, read_header, read_info
from .writer import copy_with_metadata, pack_entry, plan_fields, stamp, token_mode_for

__all__ = [
    "FORMAT_VERSION", "FORMAT_VERSION_THRESHOLDS", "Keys",
    "AllocmoeMeta", "GgufModelInfo", "StoredPlan", "read_header", "read_info",
    "check_stored_plan", "expand_counts", "find_plan", "plan_for_counts", "plan_shape", "stored_plan",
    "stored_plan_from_file",
    "copy_with_metadata", "pack_entry", "plan_fields", "stamp", "token_mode_for",
]
