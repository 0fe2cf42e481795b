"""A differential fuzzer for flex_flash_infer (issue 20).

Random mask_mod / score_mod expression trees (exprs.py) and random shapes, doors and planner
switches (cases.py) run through every public door (doors.py), on the reference backend and on
FlashInfer's path (the CPU model of its kernels, cpu_model.py, or the real kernels on a GPU), and
are compared with a float64 dense oracle and torch's own flex_attention (oracle.py). Every case
prints as Python source that reproduces it (Case.source()); campaign.py runs many.
"""
from .cases import Case, generate_case
from .doors import check

__all__ = ["Case", "check", "generate_case"]
