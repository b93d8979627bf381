from .reference import (
    check_budget,
    select_blocks,
    selection_contains,
    selection_difference,
    selection_mask,
)

__all__ = ["check_budget", "select_blocks", "selection_contains", "selection_difference", "selection_mask"]
