"""Evaluators: what `evaluate.py` computes beyond the task's metrics (samples, routing consistency, plots), chosen by
`config.evals` as big_vision does. One module per evaluator, registered by name; see `zoo.evaluators.base`."""

from zoo.evaluators.base import EvalContext, Evaluator, evaluator_names, get_evaluator, register_evaluator, select

__all__ = ["EvalContext", "Evaluator", "evaluator_names", "get_evaluator", "register_evaluator", "select"]
