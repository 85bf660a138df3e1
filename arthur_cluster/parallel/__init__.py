"""Splitting models across mlx.core.distributed ranks: pipeline (layers per stage) and tensor (every layer).

`registry` holds the static checks (no mlx import) and the table of split functions per model type.
"""

from .registry import SHARDING, ShardingError, pipeline_split, supported, tensor_blockers

__all__ = ["SHARDING", "ShardingError", "pipeline_split", "supported", "tensor_blockers"]
