"""GPU runtime: the decode-attention step of one layer on fixed buffers, with speculation on a side stream,
captured in a CUDA graph; and the speculation budget."""

from .budget import BudgetCache, BudgetDecision, choose_budget, profile_budget, trace_hit_rate
from .layer import LayerStep, StepProbe, StepSettings, StepStreams

__all__ = ["BudgetCache", "BudgetDecision", "LayerStep", "StepProbe", "StepSettings", "StepStreams", "choose_budget",
           "profile_budget", "trace_hit_rate"]
