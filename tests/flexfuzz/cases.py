"""One fuzz case: its door, shapes, planner switches and mods, drawn from (seed, index) alone, and
printable as Python source that reproduces it (Case.source()).

The first len(TOUR) cases of every seed walk through every planner route and door, so even a
short run covers them all; later cases draw their target at random. The "gpu" profile keeps
what the real kernels compile per distinct mod small: score_mods come from a fixed pool
(captured values still vary: they are kernel arguments, not code), masks stay free (the tiles
routes read bit masks, which need no compiling), and head_dim is 64 or 128.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, fields

from . import structured
from .exprs import ModWriter, Scope, uses

DEFAULT_DTYPES = {"cpu": ["float32", "float32", "float64", "float16", "bfloat16"], "gpu": ["bfloat16", "float16"]}

# Planner tunables a case may set, with the values tried (module of flex_flash_infer, name): none may
# change a result; tiny chunks put every chunk edge inside the problem.
SWITCHES = {
    "masks.tile_bounds.USE_BOUNDS": [False], "masks.tile_bounds.DEFAULT_CHUNK_ELEMENTS": [1000, 1 << 12],
    "masks.block_build.ORDER_CHUNK_TILES": [1, 5], "masks.tile_bounds.RANGE_GATHER_LIMIT": [64],
    "masks.tile_bounds.MAX_UNDECIDED_SHARE": [0.0, 1.0], "masks.tile_bounds.BOUNDED_TILES_PER_CHUNK": [3],
    "planning.paged_plan.CHUNK_ELEMENTS": [500], "planning.columns.ROWS_PER_CHUNK_ELEMENTS": [50],
    "planning.bands.MAX_RUNS_PER_SPLIT_TILE": [1], "planning.bands.MAX_SPLIT_TILES": [0, 1],
    "planning.columns.MAX_COLUMN_SHARE": [1, 2],
}
GPU_SCORE_POOL = ["softcap", "alibi", "rel_bias", "gen1", "gen2"]


@dataclass(frozen=True)
class Profile:
    """What cases to draw: "cpu" (the CPU model, every dtype, small head_dims) or "gpu" (the
    real kernels: fp16/bf16, head_dim 64/128, score_mods from GPU_SCORE_POOL); score_share:
    the share of cases with a score_mod; head_dims: the head_dims to draw from; score_pool: the GPU
    pool's members to draw from (all when empty), so that processes each compiling one member's
    modules run side by side."""
    name: str = "cpu"
    score_share: float = 0.3
    head_dims: tuple = ()
    score_pool: tuple = ()

    def __post_init__(self):
        unknown = [p for p in self.score_pool if p not in GPU_SCORE_POOL]
        if unknown:
            raise ValueError(f"score_pool: {unknown} are not in the GPU pool {GPU_SCORE_POOL}")

    def key(self) -> str:
        extra = ("" if self.score_share == 0.3 else f"s{self.score_share}") + "".join(f"d{d}" for d in self.head_dims)
        extra += "".join(f"p{p}" for p in self.score_pool)
        return self.name + (f"[{extra}]" if extra else "")


@dataclass
class Case:
    seed: int
    index: int
    target: str
    door: str                    # flex | decode | seed | varlen | paged
    backend: str                 # flashinfer | reference
    mods: str = ""               # source of build() -> (mask_mod or None, score_mod or None)
    device: str = "cpu"
    hopper: bool = True
    switches: dict = field(default_factory=dict)
    dtype: str = "float32"
    B: int = 1
    Hq: int = 1
    Hkv: int = 1
    L: int = 1
    S: int = 1
    D: int = 16
    block: object = 128
    block_mask: str = "ours"     # flex, decode: ours | torch (torch's create_block_mask) | none;
                                 # flex: tables (made elsewhere) | mutated (rewritten in place)
    broadcast: bool = True       # build the block mask with B / H = None where the mask allows it
    scale: float | None = None
    return_lse: bool = True
    nan: str = ""                # "q" or "k": NaN in one row of the inputs
    grad: bool = False
    layout: str = ""             # flex, decode: "bshd" or "sliced" q/k/v views (doors._inputs)
    Dv: int = 0                  # the values' head_dim when it differs (reference backend)
    repeat: str = ""             # flex: an earlier call on the block mask with "same" shapes, another
                                 # "scale", "dtype" or "batch"
    aux: str = ""                # flex: return_aux=AuxRequest(lse=True[, max_scores=True for "max"])
    changed: bool = False        # seed, flex (score_mod): the case's captured numbers and float tables
                                 # changed after a first call; the judged call must see the new values
                                 # (seed: or raise "call prepare() again" and run after prepare())
    route: str = ""              # flex: kernel_options={"ROUTE": route}, a tiles route forced on any mask
    decode_pos: int = 0          # decode: the first query row, and how many rows
    decode_rows: int = 1
    cu_q: list = field(default_factory=list)      # varlen
    cu_kv: list = field(default_factory=list)
    kv_lens: list = field(default_factory=list)   # paged
    qo_lens: list = field(default_factory=list)
    kv_lens2: list = field(default_factory=list)  # paged: a second plan and run on the same object
    own_modules: int = 0         # CPU model: 0, FlashInfer's own fa3 modules are not built here (band
                                 # launches run the library's one-mode copies); else a seed deciding for
                                 # each configuration whether FlashInfer's own is built (and is run)
    qo_lens2: list = field(default_factory=list)
    cache_5d: bool = False       # paged: the cache as one [pages, 2, page_size, Hkv, D] tensor
    paged_tables: str = "device"  # paged: where plan()'s tables lie (TABLE_PLACES), scribbled over after it
    paged_graph: bool = False    # paged: use_cuda_graph=True, run() captured at the first step and
                                 # replayed at the second (doors._paged_graph)
    page_size: int = 16
    input_seed: int = 0
    amplitude: float = 1.0       # q and k drawn with this standard deviation (sharp or flat softmax)
    avoid: tuple = ()            # features left out when generated (generate_case)

    @property
    def name(self) -> str:
        return f"{self.seed}:{self.index}"

    def source(self) -> str:
        """Python that reproduces this case: run it from the repository root with PYTHONPATH=tests."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "mods"}
        defaults = {f.name: f.default for f in fields(self) if not callable(f.default_factory)}
        args = ", ".join(f"{k}={v!r}" for k, v in values.items()
                         if k in ("seed", "index", "target", "door", "backend") or values[k] != defaults.get(k, object())
                         and values[k] not in ({}, []))
        return (f"# flex_flash_infer fuzz case {self.name} ({self.target}); PYTHONPATH=tests python this.py\n"
                "import torch\n"
                "from flex_flash_infer import and_masks, or_masks, get_mask_fn\n"
                "from flex_flash_infer.mods import *\n"
                "from flexfuzz import check\n\n\n"
                f"{self.mods}\n\n"
                f"check(build, {args})\n")

    def as_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------ shapes
def _length(r, profile: str) -> int:
    if profile == "gpu":
        return r.choice([1, 2, r.randint(1, 200), r.randint(200, 1100), 128, 256, 1024, 129, r.randint(1000, 2100)])
    return r.choice([1, 2, 3, r.randint(1, 70), r.randint(60, 330), 64, 128, 129, 256, 255, 200])


def _block(r, profile: str):
    if profile == "gpu":
        return r.choice([128, 128, 64, (128, 64), (64, 128)])
    return r.choice([128, 128, 64, (64, 128), (128, 64), 32, (16, 32), 16, (8, 16), 256, (512, 64)])


def _heads(r, profile: str):
    hkv = r.choice([1, 1, 2, 3] if profile == "cpu" else [1, 2, 4, 8])
    group = r.choice([1, 1, 2, 3, 4] if profile == "cpu" else [1, 2, 4])
    return hkv * group, hkv


# ------------------------------------------------------------------------------------------ targets
TARGETS = {"flex-structured": 5, "flex-library": 3, "flex-random": 4, "flex-per-head": 2, "flex-score": 4,
           "flex-empty": 1, "flex-reference": 2, "decode": 2, "seed": 2, "varlen": 2, "paged": 3}

# Every route and door, in the first cases of each seed: (target, what to force).
TOUR = [
    ("flex-library", {"lib": "causal"}),                                   # bands
    ("flex-library", {"lib": "attamba"}),                                  # bands+columns
    ("flex-structured", {"template": ["causal", "window", "sink|"]}),      # bands+columns found in the mask
    ("flex-per-head", {"template": ["per_head_window", "causal"]}),        # bands-per-head
    ("flex-structured", {"template": ["block_sparse"], "block": 64}),      # tiles
    ("flex-structured", {"template": ["causal", "tile_sparse"], "block": 32}),   # tiles-causal (many tiles: not bands)
    # tiles of 128 keys: whole tiles on the kernel gathering them (tile_gather.py); long enough for many
    ("flex-structured", {"template": ["block_sparse"], "block": 128, "L": 700}),            # tiles/gather
    ("flex-structured", {"template": ["causal", "tile_sparse"], "block": 128, "L": 900}),  # tiles-causal/gather
    ("flex-per-head", {"template": ["per_head_random"]}),                  # tiles-per-head, one launch set
    ("flex-score", {"score": "softcap", "template": ["causal"]}),          # FlashInfer's soft cap on bands
    ("flex-score", {"score": "hand", "template": ["causal", "window"]}),   # compiled score_mod bands
    ("flex-score", {"score": "rel_bias_heads", "template": ["causal"]}),   # far split
    ("flex-score", {"score": "hand", "template": ["block_sparse"]}),      # score_mod on tiles
    ("flex-score", {"score": "softcap", "template": ["causal", "tile_sparse"], "block": 128, "L": 900}),  # gather's soft cap
    ("flex-score", {"score": "hand", "template": ["causal"], "hopper": False}),   # fa2 score_mod bands
    ("paged", {"decode": True}),
    ("paged", {"decode": False}),
    ("paged", {"decode": False, "score": "hand"}),
    ("paged", {"decode": True, "template": ["per_head_window", "causal"]}),
    ("varlen", {"template": ["causal"], "equal": True}),                   # one ragged launch
    ("varlen", {}),
    ("decode", {"template": ["causal", "window"]}),
    ("seed", {}),
    ("flex-reference", {}),
    ("flex-random", {}),
    ("flex-library", {"lib": "streaming"}),                                # its sinks in the window's launch
]


# where a paged case keeps plan()'s tables: all on the device (int64 or FlashInfer's int32), the
# per-request tables on the host with the page ids on the device (FlashInfer's advice), or a mix
TABLE_PLACES = ("device", "device-int32", "host", "mixed")


def generate_case(seed: int, index: int, profile="cpu", dtypes=None, device: str = "cpu",
                  avoid=frozenset()) -> Case:
    """Case `index` of `seed`. profile: "cpu", "gpu" or a Profile. avoid: features to leave out
    ("grad", "nan", "narrow"), to look past known bugs; the same (seed, index, profile, avoid)
    always gives the same case."""
    profile = profile if isinstance(profile, Profile) else Profile(profile)
    avoid = frozenset(avoid)
    r = random.Random(f"{seed}:{index}:{profile.key()}" + (f":{','.join(sorted(avoid))}" if avoid else ""))
    if index < len(TOUR):
        target, force = TOUR[index]
    else:
        target, force = r.choices(list(TARGETS), list(TARGETS.values()))[0], {}
    door = {"decode": "decode", "seed": "seed", "varlen": "varlen", "paged": "paged"}.get(target, "flex")
    tour = index < len(TOUR)
    backend = "reference" if target == "flex-reference" or (not tour and r.random() < 0.08) else "flashinfer"
    if profile.name == "gpu":
        backend = "flashinfer"
    case = Case(seed=seed, index=index, target=target, door=door, backend=backend, device=device,
                input_seed=r.randrange(1 << 30))
    case.dtype = r.choice(dtypes or DEFAULT_DTYPES[profile.name])
    case.hopper = force.get("hopper", True) if tour else profile.name == "gpu" or r.random() < 0.8
    # drawn apart from r, so that the rest of a seed's case stays what it was before this field
    own = random.Random(f"{seed}:{index}:own modules")
    case.own_modules = own.randrange(1, 1 << 16) if own.random() < 0.5 else 0
    case.switches = dict(force.get("switches", {}))
    while not force and r.random() < 0.4:
        name = r.choice(sorted(SWITCHES))
        case.switches[name] = r.choice(SWITCHES[name])
    case.Hq, case.Hkv = _heads(r, profile.name)
    case.D = r.choice(profile.head_dims or ([8, 16, 16, 32] if profile.name == "cpu" else [64, 128]))
    case.block = _block(r, profile.name)
    pick = r.random()   # torch takes any float scale: a kernel that assumes a positive one is wrong
    case.scale = (None if pick < 0.7 else round(r.uniform(0.05, 0.6), 4) if pick < 0.95
                  else r.choice([0.0, 1.5, round(-r.uniform(0.05, 0.5), 4)]))
    case.amplitude = 1.0 if r.random() < 0.9 else r.choice([0.01, 8.0])
    case.return_lse = r.random() < 0.8
    case.broadcast = r.random() < 0.6
    if r.random() < 0.04 and "nan" not in avoid:
        case.nan = r.choice(["q", "k"])
    case.avoid = tuple(sorted(avoid))
    {"flex": _flex, "decode": _decode, "seed": _seed, "varlen": _varlen, "paged": _paged}[door](case, r, force, profile)
    # drawn apart from r: the cases of every seed drawn before this choice existed stay as they were
    if door == "paged":
        case.paged_tables = random.Random(f"{seed}:{index}:{profile.key()}:tables").choice(TABLE_PLACES)
        case.paged_graph = random.Random(f"{seed}:{index}:{profile.key()}:graph").random() < 0.3
        if case.paged_graph and not case.kv_lens2 and all(n == 1 for n in case.qo_lens):
            # a decode step replayed needs a second step: the same lengths on new pages and values
            # (longer ones could reach past what the mods were written for)
            case.kv_lens2, case.qo_lens2 = list(case.kv_lens), list(case.qo_lens)
            case.L += sum(case.qo_lens2)
    changes = random.Random(f"{seed}:{index}:{profile.key()}:changed")
    if (door == "seed" or (door == "flex" and "def score_mod" in case.mods and case.block_mask == "ours"
                           and not case.grad)) and changes.random() < 0.15:
        case.changed = True
    return case


def _square(case: Case, r, force: dict, profile: Profile) -> None:
    """A tour case's shape: one square problem whose route depends on its mask alone."""
    if force:
        case.L = case.S = force.get("L") or (r.randint(130, 330) if profile.name == "cpu" else r.randint(600, 2100))
        case.block = force.get("block") or r.choice([64, 128])
        case.dtype = "float32" if profile.name == "cpu" else case.dtype


def _scope(case: Case, q_max: int, kv_max: int, batch: int) -> Scope:
    block = case.block if isinstance(case.block, tuple) else (case.block, case.block)
    return Scope(batch=batch, heads=case.Hq, q_max=q_max, kv_max=kv_max, block=block)


def _writer(case: Case, r, scope: Scope) -> ModWriter:
    return ModWriter(r, scope, table_seed=r.randrange(1 << 20), avoid=case.avoid)


def _mods(case: Case, r, force: dict, w: ModWriter, profile: Profile, allow_per_head: bool = True) -> None:
    """Fill w's mask and score_mod for the case's target."""
    target = case.target
    template = force.get("template")
    free = target not in ("flex-random", "flex-per-head", "flex-empty") and not template
    if target == "flex-library" or (free and r.random() < 0.2):
        if force.get("lib"):
            w.mask_def = None
            _library_named(w, force["lib"])
        else:
            structured.library_mask(w)
    elif target == "flex-random" or (free and r.random() < 0.25):
        w.random_mask(r.randint(1, 4))
    elif target == "flex-per-head" and not template:
        structured.structured_mask(w, r.choice([["per_head_window", "causal"], ["per_head_random"], ["head_subset", "causal"],
                                                ["per_head_window", "document"], ["per_head_window", "abs_window"],
                                                ["head_subset", "block_sparse"]]))
    elif target == "flex-empty":
        structured.structured_mask(w, r.choice([["nothing"], ["causal", "nothing|"], ["head_subset", "causal"],
                                                ["query_from", "causal"], ["per_batch_len", "causal"]]))
    else:
        while True:
            used = structured.structured_mask(w, template)
            if template or allow_per_head or not any(p.startswith("per_head") or p == "head_subset" for p in used):
                break
            w.lines.clear(), w.tables.clear()
    if not allow_per_head and w.mask_def and uses(w.mask_def, "h"):
        w.mask_def = "def mask_mod(b, h, q_idx, kv_idx):\n    return (q_idx >= kv_idx)"
    score = force.get("score")
    if profile.name == "gpu" and profile.score_share == 0:
        score = None   # a GPU run of masks alone: no score_mod, whose variants would compile
    elif score is None and not force:   # a tour case has a score_mod only where it says so
        share = 0.9 if target == "flex-score" else profile.score_share
        if r.random() < share:
            score = r.choice(["lib", "hand", "random"])
    if score and profile.name == "gpu":   # every score_mod compiles there: the pool's alone
        pool = profile.score_pool or GPU_SCORE_POOL
        name = {"softcap": "softcap", "rel_bias_heads": "rel_bias", "alibi": "alibi"}.get(score)
        _pool_score(w, name if name in pool else r.choice(pool))
        case.block, case.page_size = 128, 16   # page sizes are compiled into the variants too
    elif score in ("lib", "softcap", "rel_bias_heads", "alibi", "rel_bias"):
        structured.library_score(w, None if score == "lib" else score)
    elif score == "hand":
        structured.handwritten_score(w)
    elif score == "random":
        w.random_score(r.randint(1, 4))


def _library_named(w: ModWriter, name: str) -> None:
    n = max(w.scope.q_max, w.scope.kv_max)
    args = {"causal": "", "attamba": f", window_size={max(1, n // 4)}, chunk_size=16",
            "streaming": f", sink_size={w.rnd.randint(1, 8)}, window_size={max(1, n // 4)}"}[name]
    w.mask_def = f'mask_mod = get_mask_fn("{name}"{args})'


POOL_SCOPE = Scope(batch=8, heads=64, q_max=4096, kv_max=4096)


def _pool_score(w: ModWriter, name: str) -> None:
    """A score_mod of the GPU pool: the library's softcap, alibi and relative-position bias, or
    one of two generated ones whose structure is fixed (their tables cover every case's range)."""
    if name in ("softcap", "alibi", "rel_bias"):
        structured.library_score(w, name)
        return
    fixed = ModWriter(random.Random(f"pool:{name}"), POOL_SCOPE, table_seed=w.rnd.randrange(1 << 20))
    fixed.count = 1000   # names apart from the mask's, and the same in every case (they name kernel arguments)
    fixed.random_score(3)
    w.lines += fixed.lines
    w.score_def = fixed.score_def


def _flex(case: Case, r, force: dict, profile: Profile) -> None:
    case.B = r.choice([1, 1, 2, 3])
    case.L, case.S = _length(r, profile.name), _length(r, profile.name)
    if r.random() < 0.3:
        case.S = case.L
    _square(case, r, force, profile)
    if case.target == "flex-per-head" and case.Hq == 1:   # a mask per head needs heads
        case.Hq = case.Hkv = 2
    w = _writer(case, r, _scope(case, case.L, case.S, case.B))
    _mods(case, r, force, w, profile)
    if w.mask_def is None and r.random() < 0.1:
        case.block_mask = "none"
    elif not force and r.random() < 0.2 and profile.name == "cpu":
        # torch's own builder; our tables with a padded last key tile listed full where the mask
        # holds on its keys (tables made elsewhere); or another mask's block mask used once and
        # then rewritten in place to this mask's tables and mask_mod
        case.block_mask = r.choice(["torch", "torch", "tables", "mutated"])
    case.mods = w.render()
    case.layout = r.choice(["", "", "", "bshd", "sliced", "dstrided"])
    if case.backend == "reference" and r.random() < 0.2:
        case.Dv = r.choice([8, 24, 2 * case.D])
    if r.random() < 0.15:
        case.repeat = r.choice(["same", "scale", "dtype", "batch"])
    if r.random() < 0.15:
        case.aux = "max" if case.backend == "reference" and r.random() < 0.5 else "lse"
    case.grad = (profile.name == "cpu" and case.dtype in ("float32", "float64") and not case.nan and "grad" not in case.avoid
                 and r.random() < 0.1)
    # the tiles routes serve every mask: forced, they must give what the planner's route gives (on
    # the GPU only without a score_mod, whose tile variants would compile modules per case)
    if (case.backend == "flashinfer" and not force and w.mask_def is not None
            and (profile.name == "cpu" or w.score_def is None) and r.random() < 0.15):
        case.route = "tiles-per-head" if uses(w.mask_def, "h") else r.choice(["tiles", "tiles-per-head"])


def _decode(case: Case, r, force: dict, profile: Profile) -> None:
    case.B = r.choice([1, 2])
    case.L, case.S = _length(r, profile.name), _length(r, profile.name)
    if r.random() < 0.5:
        case.S = case.L
    _square(case, r, force, profile)
    w = _writer(case, r, _scope(case, case.L, case.S, case.B))
    _mods(case, r, force, w, profile)
    case.mods = w.render()
    case.layout = r.choice(["", "", "bshd", "sliced", "dstrided"])
    if r.random() < 0.3 and profile.name == "cpu":
        case.block_mask = "torch"
    bq = case.block[0] if isinstance(case.block, tuple) else case.block
    case.decode_pos = r.randrange(case.L)
    room = min(bq - case.decode_pos % bq, case.L - case.decode_pos)   # rows within one query tile
    case.decode_rows = 1 if r.random() < 0.6 else r.randint(1, room)


def _seed(case: Case, r, force: dict, profile: Profile) -> None:
    case.B = 1
    case.L, case.S = _length(r, profile.name), _length(r, profile.name)
    w = _writer(case, r, _scope(case, case.L, case.S, 1))
    _mods(case, r, force, w, profile)
    two_args = w.mask_def is not None and w.mask_def.startswith("def ") and not uses(w.mask_def, "b", "h")
    case.mods = w.render(seed_form=two_args and r.random() < 0.5)
    case.repeat = "same" if r.random() < 0.2 else ""


def _varlen(case: Case, r, force: dict, profile: Profile) -> None:
    n = r.randint(2, 4) if force.get("equal") else r.randint(1, 4)
    top = 300 if profile.name == "cpu" else 1500
    lens_q = [r.choice([0, 1, r.randint(1, top)]) if r.random() < 0.2 else r.randint(1, top) for _ in range(n)]
    if not any(lens_q):   # prepare() refuses a batch without a query or without a key, and says so
        lens_q[r.randrange(n)] = r.randint(1, top)
    lens_kv = list(lens_q) if force.get("equal") or r.random() < 0.5 else [r.randint(0, top) for _ in range(n)]
    if not any(lens_kv):
        lens_kv[r.randrange(n)] = r.randint(1, top)
    case.cu_q = [0] + [sum(lens_q[:i + 1]) for i in range(n)]
    case.cu_kv = [0] + [sum(lens_kv[:i + 1]) for i in range(n)]
    case.L, case.S = case.cu_q[-1], case.cu_kv[-1]
    case.B = 1
    w = _writer(case, r, _scope(case, max(max(lens_q), 1), max(max(lens_kv), 1), n))
    _mods(case, r, force, w, profile)
    case.mods = w.render()


def _paged(case: Case, r, force: dict, profile: Profile) -> None:
    n = r.randint(1, 4)
    top = 300 if profile.name == "cpu" else 3000
    decode = force.get("decode", r.random() < 0.5)
    case.kv_lens = [r.choice([1, r.randint(1, top), r.randint(1, 40)]) for _ in range(n)]
    if decode:
        case.qo_lens = [1] * n
    else:
        case.qo_lens = [r.choice([0, 1, r.randint(1, k), k]) for k in case.kv_lens]
    case.page_size = r.choice([1, 4, 16, 16, 32] if profile.name == "cpu" else [16, 16, 32, 64])
    if r.random() < 0.4:   # the next step on the same object: one new token each, or another batch
        if r.random() < 0.5:
            case.kv_lens2, case.qo_lens2 = [k + 1 for k in case.kv_lens], [1] * n
        else:
            case.kv_lens2 = [r.randint(1, top) for _ in range(r.randint(1, 4))]
            case.qo_lens2 = [r.choice([1, r.randint(1, k)]) for k in case.kv_lens2]
    case.cache_5d = r.random() < 0.2
    case.B = 1
    case.L, case.S = sum(case.qo_lens) + sum(case.qo_lens2), max(case.kv_lens + case.kv_lens2)
    # queries sit at the end of their request's keys: their positions lie in [0, max kv_len)
    longest = max(case.kv_lens + case.kv_lens2)
    w = _writer(case, r, _scope(case, longest, longest, max(n, len(case.kv_lens2))))
    _mods(case, r, force, w, profile, allow_per_head=profile.name == "cpu")
    case.mods = w.render()
