"""Offline long-context evaluation: RULER-style tasks, perplexity through the decode path, and locality."""

from .tasks import TASKS, TaskInstance, make_task

__all__ = ["TASKS", "TaskInstance", "make_task"]
