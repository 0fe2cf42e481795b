"""Mods that look like real ones: masks built from the shapes models use (causal, windows, documents,
prefixes, chunks, sinks, dilations, key columns, block sparsity, per-head and per-batch tables)
combined with & and |, the library's own masks and score_mods (whose lowering hints take the
band, key-column, soft-cap and relative-position split routes), and hand-written score_mods
without hints. They reach the planner's band routes, which fully random trees rarely do."""
from __future__ import annotations

from .exprs import ModWriter

CAUSAL = "(q_idx >= kv_idx)"


def atom(w: ModWriter, kind: str) -> str:
    """One mask predicate as source."""
    r, s = w.rnd, w.scope
    n = max(s.q_max, s.kv_max)
    if kind == "causal":
        return CAUSAL
    if kind == "causal_bottom_right":   # the causal mask of a query block at the end of the keys
        return f"(q_idx + {w.number(max(0, s.kv_max - s.q_max))} >= kv_idx)"
    if kind == "window":
        return f"(q_idx - kv_idx < {w.number(r.randint(1, max(1, n // 2)))})"
    if kind == "abs_window":
        return f"((q_idx - kv_idx).abs() <= {w.number(r.randint(0, max(1, n // 3)))})"
    if kind == "key_from":
        return f"(kv_idx >= {w.number(r.randint(1, max(1, s.kv_max - 1)))})"
    if kind == "key_to":
        return f"(kv_idx < {w.number(r.randint(1, s.kv_max))})"
    if kind == "query_from":
        return f"(q_idx >= {w.number(r.randint(1, max(1, s.q_max - 1)))})"
    if kind == "document":
        docs = r.choice([2, 3, 5, max(2, n // 40)])
        t = w.table("int", (n,), f"torch.randint(0, {docs}, ({n},), generator=g).sort().values", docs)
        return f"({t}[q_idx] == {t}[kv_idx])"
    if kind == "prefix":
        return f"(kv_idx < {w.number(r.randint(0, max(1, s.kv_max // 2)))})"
    if kind == "chunk":
        c = w.number(r.choice([16, 32, 64, 100, r.randint(1, max(1, n))]))
        return f"(q_idx // {c} == kv_idx // {c})"
    if kind == "sink":
        return f"(kv_idx < {w.number(r.randint(1, 8))})"
    if kind == "dilation":
        return f"((q_idx - kv_idx) % {w.number(r.randint(2, 5))} == 0)"
    if kind == "columns":
        c = r.randint(2, 64)
        return f"((kv_idx + 1) % {w.number(c)} == 0)"
    if kind == "block_sparse":
        bq, bk = r.choice([s.block, s.block, (64, 64), (32, 64)])
        nq, nk = -(-s.q_max // bq), -(-s.kv_max // bk)
        t = w.table("bool", (nq, nk), f"torch.rand({nq}, {nk}, generator=g) < {r.choice([0.3, 0.6])}", 1)
        return f"{t}[q_idx // {bq}, kv_idx // {bk}]"
    if kind == "tile_sparse":   # whole tiles of the block mask: with causal, partial tiles only on the diagonal
        bq, bk = s.block
        nq, nk = -(-s.q_max // bq), -(-s.kv_max // bk)
        make = f"(torch.rand({nq}, {nk}, generator=g) < 0.3) | torch.eye({nq}, {nk}, dtype=torch.bool)"
        t = w.table("bool", (nq, nk), make, 1)   # the diagonal kept: its tiles are the causal partial ones
        return f"{t}[q_idx // {bq}, kv_idx // {bk}]"
    if kind == "random":
        t = w.table("bool", (s.q_max, s.kv_max),
                    f"torch.rand({s.q_max}, {s.kv_max}, generator=g) < {r.choice([0.1, 0.5, 0.9])}", 1)
        return f"{t}[q_idx, kv_idx]"
    if kind == "per_head_window":
        t = w.table("int", (s.heads,), f"torch.randint(1, {max(2, n)}, ({s.heads},), generator=g)", n)
        return f"(q_idx - kv_idx < {t}[h])"
    if kind == "per_head_random":
        if s.heads * s.q_max * s.kv_max > 1 << 24:   # a table that size is slow to draw: per-head windows instead
            return atom(w, "per_head_window")
        t = w.table("bool", (s.heads, s.q_max, s.kv_max),
                    f"torch.rand({s.heads}, {s.q_max}, {s.kv_max}, generator=g) < 0.5", 1)
        return f"{t}[h, q_idx, kv_idx]"
    if kind == "per_batch_len":
        t = w.table("int", (s.batch,), f"torch.randint(0, {s.kv_max + 1}, ({s.batch},), generator=g)", s.kv_max)
        return f"(kv_idx < {t}[b])"
    if kind == "head_subset":
        return r.choice([f"(h % 2 == {r.randint(0, 1)})", f"(h != {r.randint(0, max(0, s.heads - 1))})"])
    if kind == "nothing":
        return r.choice(["(kv_idx < 0)", "(q_idx > q_idx)", f"(q_idx >= {s.q_max})"])
    if kind == "narrow_causal":   # wraps past 127: the tile bounds must follow torch's int8
        return r.choice(["(q_idx.to(torch.int8) >= kv_idx.to(torch.int8))",
                         "(q_idx.to(torch.uint8) >= kv_idx.to(torch.uint8))",
                         "((q_idx - kv_idx).to(torch.int8) >= 0)"])
    raise KeyError(kind)


# Masks as models write them: conjunctions around causal, unions of a band and a few columns.
TEMPLATES = [
    ["causal"], ["causal_bottom_right"], ["causal", "window"], ["abs_window"], ["causal", "document"],
    ["document"], ["prefix|", "causal"], ["causal", "window", "sink|"], ["causal", "chunk"], ["chunk"],
    ["key_from"], ["causal", "key_from"], ["key_from", "key_to"], ["query_from", "causal"], ["causal", "dilation"],
    ["abs_window", "dilation"], ["causal", "window", "columns|"], ["causal", "block_sparse"], ["block_sparse"],
    ["random"], ["causal", "random"], ["per_head_window", "causal"], ["per_head_random"], ["per_batch_len", "causal"],
    ["head_subset", "causal"], ["nothing"], ["causal", "nothing|"], ["narrow_causal"], ["causal", "query_from"],
    ["document", "window"], ["per_batch_len", "abs_window"],
]


def structured_mask(w: ModWriter, template: list | None = None) -> list:
    """Sets w.mask_def to a combination of atoms; returns the template used. A name ending in '|'
    joins with or (a union with what came before), the others with and."""
    r = w.rnd
    template = template or r.choice([t for t in TEMPLATES if w.narrow or "narrow_causal" not in t])
    expr = None
    for part in template:
        union = part.endswith("|")
        src = atom(w, part.rstrip("|"))
        if r.random() < 0.05 and part not in ("causal", "nothing"):
            src = f"(~{src})"
        expr = src if expr is None else f"({expr} {'|' if union else '&'} {src})"
    w.mask_def = f"def mask_mod(b, h, q_idx, kv_idx):\n    return {expr}"
    return template


def library_mask(w: ModWriter) -> str:
    """One of the library's masks (with its lowering hints), alone or combined: the name used."""
    r, s = w.rnd, w.scope
    n = max(s.q_max, s.kv_max)
    name = r.choice(["full", "causal", "sliding_window", "attamba", "streaming", "prefix_lm", "document",
                     "chunked_causal", "dilated_sliding_window", "and", "or"])
    params = {
        "sliding_window": lambda: {"window_size": r.randint(1, max(1, n))},
        "attamba": lambda: {"window_size": r.randint(1, max(1, n // 2)), "chunk_size": r.randint(1, 80)},
        "streaming": lambda: {"sink_size": r.randint(0, 8), "window_size": r.randint(1, max(1, n // 2))},
        "prefix_lm": lambda: {"prefix_len": r.randint(0, n)},
        "chunked_causal": lambda: {"chunk_size": r.randint(1, max(1, n))},
        "dilated_sliding_window": lambda: {"window_size": r.randint(1, max(1, n // 2)), "dilation": r.randint(1, 4)},
    }

    def one(kind):
        if kind == "document":
            docs = r.choice([2, 3, 7])
            t = w.table("int", (n,), f"torch.randint(0, {docs}, ({n},), generator=g).sort().values", docs)
            return f'get_mask_fn("document", document_ids={t})'
        args = ", ".join(f"{k}={v}" for k, v in params.get(kind, dict)().items())
        return f'get_mask_fn("{kind}"{", " if args else ""}{args})'

    if name in ("and", "or"):
        kinds = r.sample(["causal", "sliding_window", "prefix_lm", "chunked_causal", "streaming", "full"], 2)
        w.mask_def = f"mask_mod = {name}_masks({one(kinds[0])}, {one(kinds[1])})"
    else:
        w.mask_def = f"mask_mod = {one(name)}"
    return name


def library_score(w: ModWriter, name: str | None = None) -> str:
    """One of the library's score_mods: the name used."""
    r, s = w.rnd, w.scope
    name = name or r.choice(["softcap", "alibi", "rel_bias", "rel_bias_heads", "t5", "temperature", "causal_decay"])
    if name == "softcap":
        make = f"generate_softcap_score_mod({round(r.uniform(0.5, 30), 2)})"
    elif name == "alibi":
        make = f"generate_alibi_score_mod(num_heads={s.heads})"
    elif name in ("rel_bias", "rel_bias_heads"):
        m = r.choice([1, 4, 16, 32, 64])
        shape = f"{s.heads}, {2 * m + 1}" if name == "rel_bias_heads" else f"{2 * m + 1}"
        make = f"generate_relative_position_bias_score_mod(torch.randn({shape}, generator=g))"
    elif name == "t5":
        make = (f"generate_t5_relative_bias_score_mod(torch.randn({s.heads}, 32, generator=g), "
                f"max_distance={r.choice([32, 64, 128])}, bidirectional={r.random() < 0.5})")
    elif name == "temperature":
        make = f"generate_temperature_score_mod(torch.rand({s.heads}, generator=g) + 0.5)"
    else:
        make = f"generate_causal_decay_score_mod({round(r.uniform(-0.1, 0.2), 3)})"
    w.score_def = f"score_mod = {make}"
    return name


def handwritten_score(w: ModWriter) -> str:
    """The library's patterns written by hand (no hints: the compiled variants run them)."""
    r, s = w.rnd, w.scope
    kind = r.choice(["bias_h", "rel", "softcap", "scale", "minus_inf", "alibi"])
    if kind == "bias_h":
        t = w.table("float", (s.heads,), f"torch.randn({s.heads}, generator=g)", 3)
        body = f"score + {t}[h]"
    elif kind == "rel":
        m = r.randint(1, 64)
        t = w.table("float", (m + 1,), f"torch.randn({m + 1}, generator=g)", 3)
        body = f"score + {t}[(q_idx - kv_idx).abs().clamp(max={m})]"
    elif kind == "softcap":
        c = w.number(round(r.uniform(1, 30), 2))
        body = f"{c} * torch.tanh(score / {c})"
    elif kind == "scale":
        body = f"score * {w.number(round(r.uniform(0.2, 2), 3))}"
    elif kind == "minus_inf":
        body = f"torch.where({atom(w, r.choice(['window', 'abs_window', 'key_from', 'dilation']))}, score, float('-inf'))"
    else:
        body = f"score - {w.number(round(r.uniform(0, 0.2), 3))} * (q_idx - kv_idx).abs()"
    w.score_def = f"def score_mod(score, b, h, q_idx, kv_idx):\n    return {body}"
    return kind
