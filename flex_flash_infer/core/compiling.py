"""The front doors under torch.compile: run eagerly, outside the compiled graphs."""
from __future__ import annotations

import torch


def outside_compiled_graphs(name: str):
    """A decorator: torch.compile runs the function eagerly (a graph break; with fullgraph=True an
    error saying why) rather than tracing it. Traced, its host work (tile bounds, plans, the
    tables' version counters, FlashInfer's launches) guards on data-dependent values and fails
    with errors about SymInts or builtins that name none of this."""
    reason = (f"flex_flash_infer.{name} runs outside torch.compile's graphs: it does host work (tracing the "
              "mods, reading the block mask's tables and the mods' captured values, planning) and launches "
              "FlashInfer's kernels or the reference backend eagerly, so torch.compile breaks the graph around "
              "it (correct, with gradients); fullgraph=True cannot hold it: compile without fullgraph, or use "
              "torch.nn.attention.flex_attention's own for one graph")

    def wrap(fn):
        disable = getattr(getattr(torch, "compiler", None), "disable", None)
        if disable is None:   # pragma: no cover - torch without torch.compiler
            return fn
        try:
            return disable(fn, reason=reason)
        except TypeError:     # pragma: no cover - older torch: no reason=
            return disable(fn)
    return wrap
