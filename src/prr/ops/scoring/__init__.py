from .reference import AGGREGATES, infllm_scores, oracle_scores, quest_scores

__all__ = ["AGGREGATES", "infllm_scores", "oracle_scores", "quest_scores"]
