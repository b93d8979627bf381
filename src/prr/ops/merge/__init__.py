from .reference import merge_states, merge_two

__all__ = ["merge_states", "merge_two"]
