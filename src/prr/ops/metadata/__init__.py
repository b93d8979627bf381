from .reference import (
    infllm_metadata,
    infllm_metadata_append,
    num_windows,
    quest_metadata,
    quest_metadata_append,
)

__all__ = ["infllm_metadata", "infllm_metadata_append", "num_windows", "quest_metadata", "quest_metadata_append"]
