"""A score_mod that only multiplies the score by a number (the identity, `score / temperature`,
`score * 0.5`, `-score`) is FlashInfer's own scale: the plan folds the factor into sm_scale and
runs the plain kernels, where the score_mod would compile a variant (minutes on first use) and
run it.

Read from the traced expression, not sampled, so it is exact about what it folds: the output
must be the score itself, or a product / quotient / negation of it by Python numbers (literals
or captured ones, whose values the plan reads now, as it does for a compiled variant). Anything
else, including a 0-d tensor factor (its dtype could change torch's rounding), is not folded.
"""
from __future__ import annotations

import math

import torch

from ..core.trace import Node, TraceError, trace


def _number(node: Node) -> float | None:
    """The value of a Python number (a literal or a captured one), else None."""
    if node.op in ("const", "scalar") and node.tier == 0 and not isinstance(node.value, bool):
        return float(node.value)
    return None


def _factor(node: Node) -> float | None:
    """c when node computes c * score in float32, else None."""
    if node.op == "input" and node.attr == "score":
        return 1.0
    if node.dtype != torch.float32:
        return None
    if node.op == "cast" and node.args[0].dtype == torch.float32:
        return _factor(node.args[0])
    if node.op == "neg":
        inner = _factor(node.args[0])
        return None if inner is None else -inner
    if node.op == "mul":
        a, b = node.args
        for x, c in ((a, _number(b)), (b, _number(a))):
            inner = None if c is None else _factor(x)
            if inner is not None:
                return inner * c
        return None
    if node.op == "div":
        a, b = node.args
        c, inner = _number(b), _factor(a)
        if inner is None or c is None or c == 0:
            return None
        return inner / c
    return None


def score_scale_factor(score_mod, graph=None) -> float | None:
    """c when score_mod(score, b, h, q, kv) is c * score for a finite, nonzero number c, else
    None (including a score_mod that cannot be traced: its own route reports that). graph: its
    trace when the caller has it."""
    if score_mod is None:
        return None
    if graph is None:
        try:
            graph = trace(score_mod, "score_mod")
        except TraceError:
            return None
    c = _factor(graph.output)
    return c if c is not None and math.isfinite(c) and c != 0 else None


def fold_score_mod(score_mod, scale: float, graph=None):
    """(score_mod, scale), or (None, scale * c) when score_mod is c * score and the product is a
    finite, nonzero scale. graph: score_mod's trace when the caller has it."""
    c = score_scale_factor(score_mod, graph)
    if c is None:
        return score_mod, scale
    folded = scale * c
    if not kernel_scale_ok(folded):
        return score_mod, scale
    return None, folded


# FlashInfer's kernels hold sm_scale as a float32: a scale that is 0, subnormal or inf there (1e-300
# is a nonzero double) gives NaN rows, as sm_scale 0 does
_F32 = torch.finfo(torch.float32)


def kernel_scale_ok(scale: float) -> bool:
    """Whether FlashInfer's kernels can take this scale: a normal float32 number, nonzero."""
    return math.isfinite(scale) and _F32.tiny <= abs(scale) <= _F32.max
