"""Random mask_mod and score_mod expression trees, written as Python source.

A ModWriter builds the source of one `build()` function returning (mask_mod, score_mod): captured
tables are drawn inside it from a seeded torch.Generator and captured numbers are closure
variables (the tracer turns those into kernel arguments) or literals, so the source alone
reproduces the mods. Every expression keeps what torch would compute well defined:

  * a table is indexed only by values inside its range (`% n`, `clamp`, or a position whose
    range the table covers);
  * integer arithmetic on positions stays below 2**30, so int32 positions (the library's and
    torch's compiled kernels') and int64 ones (torch's eager path) give the same values; narrow
    casts (int16, int8, uint8) wrap as torch wraps them, and that wrapped value is the oracle;
  * a score_mod never compares the score itself: a comparison on a floating score flips between
    float32 and float64 at its edge, so its outputs would differ for no fault of either side.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

W32, I64 = "w32", "torch.int64"          # positions (int32 in the library, int64 in torch eager), int64
NARROW = {"torch.int16": 32768, "torch.int8": 128, "torch.uint8": 256}
LIMIT = {W32: 1 << 30, I64: 1 << 62}


@dataclass(frozen=True)
class Scope:
    """The ranges the mods are evaluated on: b in [0, batch), h in [0, heads), q_idx in [0, q_max),
    kv_idx in [0, kv_max); block is a tile size hint for block-sparse tables."""
    batch: int
    heads: int
    q_max: int
    kv_max: int
    block: tuple = (128, 128)


@dataclass(frozen=True)
class I:
    """An integer expression: its source, a bound on |value|, its torch dtype class, and whether
    it is a tensor (reads an argument or a table) rather than a Python number."""
    src: str
    bound: int
    dtype: str = W32
    var: bool = True


@dataclass(frozen=True)
class F:
    src: str
    bound: float
    var: bool = True


def _promote(a: str, b: str) -> str:
    if a == b:
        return a
    if I64 in (a, b):
        return I64
    if W32 in (a, b):
        return W32
    return "torch.int16"   # two different narrow types meet in int16, as torch promotes them


def _fits(bound: int, dtype: str) -> int | None:
    """The bound of a result of this dtype, or None when it could overflow a wide type."""
    if dtype in NARROW:
        return min(bound, NARROW[dtype])
    return bound if bound < LIMIT[dtype] else None


class ModWriter:
    """Writes one build(device) function. rnd: a random.Random; scope: the ranges (Scope); avoid:
    {"narrow"} leaves out int16/int8/uint8 values, int64 table values past 2**31 and bool + bool
    (issue 20's class 5), so that a campaign can look past a known bug."""

    def __init__(self, rnd, scope: Scope, table_seed: int, avoid=frozenset()):
        self.rnd = rnd
        self.narrow = "narrow" not in avoid
        self.scope = scope
        self.table_seed = table_seed
        self.lines = []          # statements inside build(), before the mods
        self.tables = []         # (name, kind, shape, value bound)
        self.count = 0
        self.table_dtypes = {}   # int tables: name -> dtype class
        self.mask_def = None     # source of the mask_mod (a def or an assignment), None for no mask
        self.score_def = None

    # ---------------------------------------------------------------- declarations
    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def number(self, value, literal_share: float = 0.5) -> str:
        """A constant as a literal or as a captured closure variable (a kernel argument)."""
        if self.rnd.random() < literal_share:
            return repr(value)
        name = self.name("c")
        self.lines.append(f"{name} = {value!r}")
        return name

    def table(self, kind: str, shape: tuple, make: str, bound) -> str:
        name = self.name("t")
        # drawn on the CPU (the same values everywhere), kept where the mods run: a mask indexing a
        # CPU table by CUDA positions fails in torch itself
        self.lines.append(f"{name} = ({make}).to(device)")
        self.tables.append((name, kind, shape, bound))
        return name

    def int_table(self, n: int) -> tuple[str, int, str]:
        """(name, bound, dtype) of a new 1-D int table of n entries."""
        r = self.rnd
        style = r.choice(["ids", "sorted", "wide", "narrow", "big"] if self.narrow else ["ids", "sorted", "wide"])
        hi = r.choice([2, 3, 5, max(2, n // 3), max(2, n)])
        if style == "sorted":   # document ids of packed sequences
            make, bound, dtype = f"torch.randint(0, {hi}, ({n},), generator=g).sort().values", hi, I64
        elif style == "wide":
            make, bound, dtype = f"torch.randint(-{hi}, {hi}, ({n},), generator=g, dtype=torch.int32)", hi, W32
        elif style == "narrow":
            dtype = r.choice(list(NARROW))
            lo = 0 if dtype == "torch.uint8" else -min(hi, 100)
            make, bound = f"torch.randint({lo}, {min(hi, 100)}, ({n},), generator=g, dtype={dtype})", 128
        elif style == "big":    # int64 values past 2**31: a kernel that reads them as int32 differs
            make = f"torch.randint(0, {hi}, ({n},), generator=g) + (1 << {r.choice([31, 32, 40])})"
            bound, dtype = 1 << 41, I64
        else:
            make, bound, dtype = f"torch.randint(0, {hi}, ({n},), generator=g)", hi, I64
        return self.table("int", (n,), make, bound), bound, dtype

    # ---------------------------------------------------------------- integer expressions
    def int_leaf(self, depth: int) -> I:
        r, s = self.rnd, self.scope
        pick = r.random()
        if pick < 0.30:
            return I("q_idx", s.q_max)
        if pick < 0.60:
            return I("kv_idx", s.kv_max)
        if pick < 0.68:
            return I("b", s.batch)
        if pick < 0.78:
            return I("h", s.heads)
        if pick < 0.90 or depth <= 0:
            value = r.choice([r.randint(0, 8), r.randint(0, max(s.q_max, s.kv_max) + 4)])
            return I(self.number(value), value, var=False)
        return self.int_load(depth - 1)

    def var_leaf(self) -> I:
        s = self.scope
        return self.rnd.choice([I("q_idx", s.q_max), I("kv_idx", s.kv_max), I("b", s.batch), I("h", s.heads)])

    def tensor(self, e: I) -> I:
        """e if it is a tensor, else a position: methods like .abs() or .to() need a tensor."""
        return e if e.var else self.var_leaf()

    def index(self, n: int, depth: int) -> str:
        """An index expression whose values lie in [0, n)."""
        r, s = self.rnd, self.scope
        direct = [v for v, size in (("q_idx", s.q_max), ("kv_idx", s.kv_max), ("h", s.heads), ("b", s.batch))
                  if size <= n]
        if direct and r.random() < 0.5:
            return r.choice(direct)
        e = self.tensor(self.int_expr(depth))
        if e.dtype != W32 and e.dtype != I64:
            e = I(f"{e.src}.long()", e.bound, I64)   # narrow values wrap: widen before the modulo
        if r.random() < 0.5:
            return f"({e.src}) % {n}"
        return r.choice([f"({e.src}).clamp(0, {n - 1})", f"torch.clamp({e.src}, 0, {n - 1})"])

    def int_load(self, depth: int) -> I:
        s = self.scope
        ints = [t for t in self.tables if t[1] == "int"]
        if ints and self.rnd.random() < 0.4:
            name, _, (n,), bound = self.rnd.choice(ints)
            dtype = self.table_dtypes.get(name, I64)   # structured.py's int tables are torch.randint's int64
        else:
            n = self.rnd.choice([s.q_max, s.kv_max, max(s.q_max, s.kv_max), s.heads, s.batch, self.rnd.randint(1, 40)])
            name, bound, dtype = self.int_table(n)
            self.table_dtypes[name] = dtype
        return I(f"{name}[{self.index(n, depth)}]", bound, dtype)

    def int_expr(self, depth: int) -> I:
        r = self.rnd
        if depth <= 0 or r.random() < 0.25:
            return self.int_leaf(depth)
        op = r.choices(["add", "sub", "mulc", "mul", "neg", "abs", "minmax", "floordiv", "mod", "clamp", "where",
                        "cast", "bits", "bitnot", "from_bool"],
                       [3, 3, 2, 1, 1, 2, 2, 2, 2, 1, 1, 2, 1, 0.5, 1])[0]
        a = self.int_expr(depth - 1)
        if op in ("add", "sub", "mul", "minmax"):
            b = self.int_expr(depth - 1)
            if op == "minmax":
                a, b = self.tensor(a), self.tensor(b)   # torch.minimum takes tensors only
            # a Python number takes the tensor's dtype, as torch's promotion does
            dtype = _promote(a.dtype, b.dtype) if a.var and b.var else (a.dtype if a.var else b.dtype)
            var = a.var or b.var
            if op == "mul":
                bound = _fits(a.bound * b.bound, dtype)
                if bound is not None:
                    return I(f"({a.src} * {b.src})", bound, dtype, var)
                op = "add"
            if op == "minmax":
                fn = r.choice(["torch.minimum", "torch.maximum"])
                return I(f"{fn}({a.src}, {b.src})", max(a.bound, b.bound), dtype)
            bound = _fits(a.bound + b.bound, dtype)
            if bound is None:
                return a
            return I(f"({a.src} {'+' if op == 'add' else '-'} {b.src})", bound, dtype, var)
        if op == "mulc":
            c = r.choice([-3, -1, 2, 3, 5])
            bound = _fits(a.bound * abs(c), a.dtype)
            return a if bound is None else I(f"({a.src} * {self.number(c)})", bound, a.dtype, a.var)
        if op == "neg":
            return I(f"(-{a.src})", _fits(a.bound + 1, a.dtype) or a.bound, a.dtype, a.var)
        if op in ("abs", "clamp", "cast"):
            a = self.tensor(a)
        if op == "abs":
            src = r.choice([f"({a.src}).abs()", f"torch.abs({a.src})", f"abs({a.src})"])
            return I(src, a.bound + 1, a.dtype)
        if op in ("floordiv", "mod"):
            c = r.choice([1, 2, 3, 7, 16, r.randint(1, max(2, self.scope.kv_max))])
            if a.dtype in NARROW and c >= NARROW[a.dtype] // 2:
                c = 7
            if op == "floordiv":
                return I(f"({a.src} // {self.number(c)})", a.bound, a.dtype, a.var)
            return I(f"({a.src} % {self.number(c)})", min(a.bound, c), a.dtype, a.var)
        if op == "clamp":
            lo = r.randint(-4, max(1, a.bound // 2))
            hi = lo + r.randint(0, max(1, a.bound))
            if a.dtype in NARROW:
                lo, hi = max(lo, 0), min(hi, 100)
                hi = max(lo, hi)
            form = r.choice([f"({a.src}).clamp({lo}, {hi})", f"({a.src}).clamp(min={lo})", f"({a.src}).clamp(max={hi})",
                             f"torch.clamp({a.src}, {lo}, {hi})"])
            return I(form, max(a.bound, abs(lo), abs(hi)), a.dtype)
        if op == "where":
            a, b = self.tensor(a), self.tensor(self.int_expr(depth - 1))   # a number may not fit a narrow type
            cond = self.bool_expr(depth - 1)
            dtype = _promote(a.dtype, b.dtype) if a.var and b.var else (a.dtype if a.var else b.dtype)
            return I(f"torch.where({cond}, {a.src}, {b.src})", max(a.bound, b.bound), dtype)
        if op == "cast":
            dtype = r.choice(["torch.int32", "torch.int64", *(NARROW if self.narrow else ())])
            form = {"torch.int32": r.choice([".to(torch.int32)", ".int()"]),
                    "torch.int64": r.choice([".to(torch.int64)", ".long()"])}.get(dtype, f".to({dtype})")
            if dtype == "torch.int32":
                return I(f"({a.src}){form}", a.bound, W32) if a.bound < LIMIT[W32] else a
            new = I64 if dtype == "torch.int64" else dtype
            return I(f"({a.src}){form}", _fits(a.bound, new), new)
        if op == "bits":
            c = r.choice([1, 3, 7, 15, 64])
            sym = r.choice(["&", "|", "^"])
            return I(f"({a.src} {sym} {self.number(c)})", max(a.bound, c) * 2, a.dtype, a.var)
        if op == "bitnot":
            return I(f"(~{a.src})", a.bound + 1, a.dtype, a.var)
        # from_bool: bool arithmetic gives ints (bool + int) or stays bool (bool + bool)
        cond = self.bool_expr(depth - 1)
        form = r.choice([f"({cond}).to(torch.int32)", f"({cond}).long()", f"({cond}).int()",
                         f"({cond} * {r.randint(1, 5)})", f"({cond} + {r.randint(0, 3)})"])
        return I(form, 8, W32 if ".int" in form or "int32" in form else I64)

    # ---------------------------------------------------------------- bool expressions
    def compare(self, depth: int) -> str:
        r, s = self.rnd, self.scope
        a = self.tensor(self.int_expr(depth))
        if r.random() < 0.5:
            b = self.int_expr(depth)
        else:
            value = r.randint(-3, max(s.q_max, s.kv_max) + 3)
            if a.dtype in NARROW:
                value = r.randint(-3, 100)
            b = I(self.number(value), abs(value))
        return f"({a.src} {r.choice(['<', '<=', '>', '>=', '==', '!='])} {b.src})"

    def bool_expr(self, depth: int) -> str:
        r = self.rnd
        if depth <= 0 or r.random() < 0.3:
            if depth > 0 and r.random() < 0.15:
                return self.bool_load(depth - 1)
            return self.compare(max(depth - 1, 0))
        op = r.choices(["and", "or", "xor", "not", "where", "from_int", "bool_add", "bool_mul"],
                       [4, 4, 1, 1.5, 1, 1, 0.7 * self.narrow, 0.5 * self.narrow])[0]
        a = self.bool_expr(depth - 1)
        if op == "not":
            return r.choice([f"(~{a})", f"torch.logical_not({a})"])
        if op == "from_int":
            e = self.tensor(self.int_expr(depth - 1))
            return r.choice([f"({e.src}).to(torch.bool)", f"({e.src}).bool()", f"({e.src} != 0)"])
        b = self.bool_expr(depth - 1)
        if op == "where":
            return f"torch.where({self.bool_expr(depth - 1)}, {a}, {b})"
        sym = {"and": "&", "or": "|", "xor": "^", "bool_add": "+", "bool_mul": "*"}[op]
        return f"({a} {sym} {b})"

    def bool_load(self, depth: int) -> str:
        r, s = self.rnd, self.scope
        if r.random() < 0.5:
            bq, bk = r.choice([s.block, (16, 16), (64, 64), (32, 128)])
            nq, nk = -(-s.q_max // bq), -(-s.kv_max // bk)
            keep = self.table("bool", (nq, nk), f"torch.rand({nq}, {nk}, generator=g) < {r.choice([0.3, 0.5, 0.8])}", 1)
            return f"{keep}[q_idx // {bq}, kv_idx // {bk}]"
        n = r.choice([s.kv_max, s.q_max, s.heads, r.randint(1, 30)])
        t = self.table("bool", (n,), f"torch.rand({n}, generator=g) < 0.5", 1)
        return f"{t}[{self.index(n, depth)}]"

    # ---------------------------------------------------------------- float expressions (score_mod)
    def float_leaf(self, depth: int) -> F:
        r, s = self.rnd, self.scope
        pick = r.random()
        if pick < 0.5:
            return F("score", 10.0)
        if pick < 0.6:
            c = round(r.uniform(-2, 2), 3)
            return F(self.number(c), abs(c), var=False)
        if pick < 0.8 and depth > 0:
            n = r.choice([s.heads, s.kv_max, 2 * r.randint(1, 20) + 1])
            dtype = r.choice(["", "", ", dtype=torch.float64", ", dtype=torch.float16"])
            t = self.table("float", (n,), f"torch.randn({n}, generator=g{dtype}) * 0.5", 2.5)
            return F(f"{t}[{self.index(n, depth - 1)}]", 2.5)
        if pick < 0.9:
            e = self.tensor(self.int_expr(max(depth - 1, 0)))
            c = round(r.uniform(-3, 3) / max(1, e.bound), 6)
            form = r.choice([f"({e.src}).to(torch.float32) * {c}", f"({e.src}).float() * {c}", f"({e.src} * {c})"])
            return F(form, abs(c) * e.bound)
        cond = self.bool_expr(max(depth - 1, 0))
        c = round(r.uniform(-2, 2), 3)
        return F(r.choice([f"({cond}) * {c}", f"({cond}).to(torch.float32) * {c}"]), abs(c))

    def float_expr(self, depth: int) -> F:
        r = self.rnd
        if depth <= 0 or r.random() < 0.3:
            return self.float_leaf(depth)
        op = r.choices(["add", "sub", "mulc", "softcap", "where", "minus_inf", "minmax", "abs", "sigmoid", "div"],
                       [4, 2, 2, 1, 2, 0.5, 1, 0.5, 0.5, 0.5])[0]
        a = self.float_expr(depth - 1)
        if op in ("minmax", "softcap", "abs", "sigmoid") and not a.var:
            a = F("score", 10.0)   # torch functions and methods take tensors, not Python floats
        if op in ("add", "sub", "minmax", "where"):
            b = self.float_expr(depth - 1)
            if op == "minmax" and not b.var:
                b = F("score", 10.0)
            if op == "where":
                return F(f"torch.where({self.bool_expr(depth - 1)}, {a.src}, {b.src})", max(a.bound, b.bound))
            if op == "minmax":
                return F(f"{r.choice(['torch.minimum', 'torch.maximum'])}({a.src}, {b.src})", max(a.bound, b.bound))
            return F(f"({a.src} {'+' if op == 'add' else '-'} {b.src})", a.bound + b.bound, a.var or b.var)
        if op == "mulc":
            c = round(r.uniform(-1.5, 1.5), 3)
            return F(f"({a.src} * {self.number(c)})", a.bound * abs(c), a.var)
        if op == "softcap":
            c = round(r.uniform(1, 30), 2)
            cap = self.number(c)
            return F(r.choice([f"({cap} * torch.tanh({a.src} / {cap}))", f"(({a.src}) / {cap}).tanh() * {cap}"]), c)
        if op == "minus_inf":   # masking through the score_mod, as torch's docs show
            return F(f"torch.where({self.bool_expr(depth - 1)}, {a.src}, float('-inf'))", a.bound)
        if op == "abs":
            return F(r.choice([f"({a.src}).abs()", f"torch.abs({a.src})"]), a.bound)
        if op == "sigmoid":
            return F(f"(torch.sigmoid({a.src}) * {round(r.uniform(0.5, 4), 2)})", 4.0)
        c = round(r.uniform(0.5, 4), 2)
        return F(f"({a.src} / {self.number(c)})", a.bound / c, a.var)

    # ---------------------------------------------------------------- whole mods
    def random_mask(self, depth: int) -> None:
        self.mask_def = f"def mask_mod(b, h, q_idx, kv_idx):\n    return {self.bool_expr(depth)}"

    def random_score(self, depth: int) -> None:
        f = self.float_expr(depth)
        body = f.src if "score" in f.src or self.rnd.random() < 0.1 else f"score + {f.src}"
        self.score_def = f"def score_mod(score, b, h, q_idx, kv_idx):\n    return {body}"

    def render(self, seed_form: bool = False) -> str:
        """The build() source. seed_form: the mask as the seed's two-argument mask_fn(q_idx, kv_idx)."""
        body = [f"g = torch.Generator().manual_seed({self.table_seed})", *self.lines]
        mask = self.mask_def or "mask_mod = None"
        if seed_form and mask.startswith("def mask_mod(b, h, q_idx, kv_idx)"):
            mask = mask.replace("def mask_mod(b, h, q_idx, kv_idx)", "def mask_mod(q_idx, kv_idx)", 1)
        body += mask.split("\n") + (self.score_def or "score_mod = None").split("\n")
        body.append("return mask_mod, score_mod")
        return 'def build(device="cpu"):\n' + "\n".join("    " + line for line in body) + "\n"


def uses(src: str, *names: str) -> bool:
    """Whether a mod's source reads any of these argument names (a cheap, conservative test)."""
    return any(re.search(rf"\b{n}\b", src) for n in names)

