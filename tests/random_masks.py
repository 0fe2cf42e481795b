"""Masks shared by several test folders: a random mask_mod over a captured tensor, random mask
expressions (source text over b, h, q, kv and captured tables), and two formulas that send a call
to the tiles and the per-head routes."""
import random

import torch


def random_mask_mod(B, H, L, S, rng, density=0.3):
    """A mask_mod over a captured random tensor, with some all-true and all-false regions."""
    dense = torch.rand(B, H, L, S, generator=rng) < density
    dense[..., : L // 3, : S // 4] = True
    dense[..., L // 2:, S // 2:] = False

    def random_mask(b, h, q, kv):
        return dense[b, h, q, kv]

    return random_mask, dense


def striped_causal(b, h, q, kv):
    """Causal with a fifth of the pairs removed in a pattern that no band describes: the tiles route."""
    return ((q * 7 + kv * 13) % 5 != 0) & (kv <= q)


def per_head_starts(b, h, q, kv):
    """Head h sees keys from 3 + 40 h on: a mask that differs per head (the per-head routes)."""
    return kv >= 3 + 40 * h


def random_int_expression(r: random.Random, depth: int) -> str:
    """Source of a random int expression of b, h, q, kv, a number w, a table read D[...] (D: 1000
    int32 values) and the ops traced masks use."""
    if depth == 0 or r.random() < 0.3:
        return r.choice(["b", "h", "q", "kv", "q", "kv", str(r.randint(-40, 40)), "w"])
    a, b = random_int_expression(r, depth - 1), random_int_expression(r, depth - 1)
    op = r.choice(["+", "-", "*", "//", "%", "min", "max", "abs", "where", "clamp", "cast", "load", "neg",
                   "bitnot", "bitwise"])
    if op in "+-*":
        return f"({a} {op} {b})"
    if op in ("//", "%"):
        return f"({a} {op} {r.choice([3, 7, -4, 64, 100])})"
    if op in ("min", "max"):
        return f"torch.{'minimum' if op == 'min' else 'maximum'}({a} + q * 0, {b} + q * 0)"
    if op == "abs":
        return f"torch.abs({a} + q * 0)"
    if op == "where":
        return f"torch.where({random_bool_expression(r, depth - 1)}, {a} + q * 0, {b} + q * 0)"
    if op == "clamp":
        return f"torch.clamp({a} + q * 0, {r.randint(-50, 0)}, {r.randint(1, 500)})"
    if op == "cast":
        return f"({random_bool_expression(r, depth - 1)}).to(torch.int32)"
    if op == "load":   # an int table read, in range by construction
        return f"D[torch.clamp({a} + q * 0, 0, 999)]"
    if op == "bitnot":
        return f"(~({a} + q * 0))"
    if op == "bitwise":
        return f"(({a} + q * 0) {r.choice(['&', '|', '^'])} {b})"
    return f"(-{a})"


def random_bool_expression(r: random.Random, depth: int) -> str:
    """Source of a random bool expression over the same names and T (a [12, 12] bool table)."""
    if depth == 0 or r.random() < 0.2:
        return r.choice(["(q >= kv)", "(kv < w)", "T[q // 64 % 12, kv // 64 % 12]", "(h == 1)", "(b > 0)"])
    op = r.choice(["cmp", "cmp", "and", "or", "xor", "not", "where", "table"])
    if op == "cmp":
        sym = r.choice(["<", "<=", ">", ">=", "==", "!="])
        # tied to q, so that two constants still compare as a tensor, not a Python bool
        return f"(({random_int_expression(r, depth - 1)}) + q * 0 {sym} ({random_int_expression(r, depth - 1)}))"
    if op in ("and", "or", "xor"):
        sym = {"and": "&", "or": "|", "xor": "^"}[op]
        return f"({random_bool_expression(r, depth - 1)} {sym} {random_bool_expression(r, depth - 1)})"
    if op == "not":
        return f"(~{random_bool_expression(r, depth - 1)})"
    if op == "where":
        return f"torch.where({random_bool_expression(r, depth - 1)}, {random_bool_expression(r, depth - 1)}, {random_bool_expression(r, depth - 1)})"
    return f"T[torch.clamp({random_int_expression(r, depth - 1)} + q * 0, 0, 11), kv // 64 % 12]"


def random_table(r: random.Random, rng) -> torch.Tensor:
    """The D of random_int_expression: 1000 int32 values, sorted (document ids), sorted
    descending, or in no order."""
    values = torch.randint(0, 9, (1000,), generator=rng)
    order = r.choice(["ascending", "descending", "none"])
    if order != "none":
        values = torch.sort(values, descending=order == "descending").values
    return values.to(torch.int32)
