"""What the doors keep between calls (a prepared kernel, a cached block mask, a converted torch
BlockMask, context-parallel block masks, a hint read off a user's mask) must follow the values
it was made from: a number the mod reads changed, or a table written where no version counter
moves (through .data, numpy memory, an inference tensor) on the CPU backends. Each case gave
the old values' answer (errors 0.3-3.0) before its fix."""
import types

import pytest
import torch
import torch.distributed as dist

from flex_flash_infer import FlexFlashInfer, flex_attention, get_mask_fn
from flex_flash_infer.masks.block_build import FULL, PARTIAL

WRITES = ("in_place", "data", "numpy", "inference")


def _dense(q, k, v, mask_mod, score_mod=None):
    """float64 softmax attention over [B, H, L, D] with the mask evaluated everywhere."""
    B, H, L, _ = q.shape
    S = k.shape[2]
    grid = (torch.arange(B).view(-1, 1, 1, 1), torch.arange(H).view(1, -1, 1, 1), torch.arange(L).view(1, 1, -1, 1),
            torch.arange(S).view(1, 1, 1, -1))
    s = q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5
    if score_mod is not None:
        s = score_mod(s, *grid)
    s = s.masked_fill(~mask_mod(*grid).expand_as(s), float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v.double()


def _table(fill, n, inference):
    if inference:
        with torch.inference_mode():
            return torch.full((n,), fill)
    return torch.full((n,), fill)


def _write(t, index, value, how):
    if how == "in_place":
        t[index] = value
    elif how == "data":
        t.data[index] = value
    elif how == "numpy":
        t.numpy()[index] = value
    else:
        with torch.inference_mode():
            t[index] = value


SLOPE = 0.0


@pytest.mark.parametrize("change", ["closure", "global", "folded_factor"])
def test_prepared_score_mod_number_changed_raises(flashinfer_on_cpu, rng, change):
    """FlexFlashInfer compiles a score_mod's numbers into the kernel: a closure number, a module
    global or a factor folded into the scale changed after prepare() raises as the mask_fn's
    does (it ran the old number: errors 1.1-3.0)."""
    global SLOPE
    L, H, D = 256, 2, 16
    q, k, v = (torch.randn(L, H, D, generator=rng) for _ in range(3))
    c = 1.0
    if change == "closure":
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + c * 0.0 + (c - 1.0) * (q_idx - kv_idx) / 64
    elif change == "global":
        def score_mod(score, b, h, q_idx, kv_idx):
            return score - SLOPE * (q_idx - kv_idx)
    else:
        def score_mod(score, b, h, q_idx, kv_idx):
            return score * c
    ffi = FlexFlashInfer(device="cpu").prepare(get_mask_fn("causal"), L, L, H, H, D, dtype=torch.float32,
                                               score_mod=score_mod)
    assert ffi.active_backend == "flashinfer"
    ffi(q, k, v)
    try:
        c, SLOPE = 4.0, 0.05
        with pytest.raises(ValueError, match="score_mod reads .* changed after prepare"):
            ffi(q, k, v)
        c, SLOPE = 1.0, 0.0      # back to the prepared numbers: the object is usable again
        ffi(q, k, v)
    finally:
        SLOPE = 0.0


WINDOW = 512


def test_transformers_cached_block_mask_follows_a_global_number(rng):
    """attention_mods keeps one block mask per mask_mod object and shape: a global the mask_mod
    reads changed between forward passes builds it again (the old window's tiles: 2.2 off)."""
    global WINDOW
    from flex_flash_infer.integrations.transformers import attention_forward, attention_mods

    def my_window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < WINDOW)

    q, k, v = (torch.randn(1, 2, 512, 16, generator=rng, dtype=torch.float64) for _ in range(3))
    module = types.SimpleNamespace(training=False, config=None, is_causal=True)
    try:
        with torch.no_grad(), attention_mods(mask_mod=my_window):
            for WINDOW in (512, 16):
                got, _ = attention_forward(module, q, k, v, None)
                assert (got.transpose(1, 2) - _dense(q, k, v, my_window)).abs().max() < 1e-10, WINDOW
    finally:
        WINDOW = 512


@pytest.mark.parametrize("how", WRITES)
def test_torch_block_mask_settled_tiles_follow_unseen_writes(how):
    """A torch BlockMask of 1000 tokens: its last query tile's tiles are settled from what the
    mask_mod reads; on the reference backend a write no counter records converts it again (the
    old settled tiles gave rows that see nothing 0.33)."""
    from torch.nn.attention.flex_attention import create_block_mask as torch_create_block_mask

    L = 1000
    rows = _table(True, 1024, how == "inference")

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & rows[q_idx]

    torch_mask = torch_create_block_mask(mask_mod, None, None, L, L, device="cpu")
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, L, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    flex_attention(q, k, v, block_mask=torch_mask, backend="reference")
    _write(rows, slice(950, None), False, how)
    got = flex_attention(q, k, v, block_mask=torch_mask, backend="reference")
    assert (got - _dense(q, k, v, mask_mod)).abs().max() < 1e-10


W = 300


@pytest.mark.parametrize("backend", ["reference", "flashinfer"])
def test_prepared_block_mask_of_a_users_window_follows_its_global(flashinfer_on_cpu, backend):
    """FlexFlashInfer reads a user's own window mask as bands (a hint on a wrapper around it):
    flex_attention with that block mask after the global window changed runs the new window on
    its tables, as torch would (both backends kept the old plan: 1.9 off)."""
    global W
    L, H, D = 512, 2, 16

    def win(q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < W)

    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, H, L, D, generator=gen) for _ in range(3))
    block_mask = FlexFlashInfer(device="cpu").prepare(win, L, L, H, H, D, dtype=torch.float32).block_mask

    def on_tables(b, h, q_idx, kv_idx):   # as torch reads a block mask: full tiles skip the mask_mod
        state = block_mask.states[0, 0][q_idx // 128, kv_idx // 128]
        return (state == FULL) | ((state == PARTIAL) & win(q_idx, kv_idx))

    try:
        for W in (300, 16):
            got = flex_attention(q, k, v, block_mask=block_mask, backend=backend)
            assert (got.double() - _dense(q, k, v, on_tables)).abs().max() < 1e-5, W
        assert (got - flex_attention(q, k, v, block_mask=block_mask, backend="reference")).abs().max() < 1e-5
    finally:
        W = 300


@pytest.mark.parametrize("how", WRITES)
def test_context_parallel_block_masks_follow_unseen_writes(tmp_path, how):
    """ContextParallelFlexAttention keeps its block masks while what the mask_mod reads holds: on
    the CPU a table written through .data, numpy or as an inference tensor builds them again
    (the old windows: 2.8 off)."""
    from flex_flash_infer.context_parallel import ContextParallelFlexAttention

    L = 512
    w = _table(400, L, how == "inference")

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < w[q_idx])

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        attention = ContextParallelFlexAttention(mask_mod, L, backend="reference")
        gen = torch.Generator().manual_seed(7)
        q, k, v = (torch.randn(1, 2, L, 16, generator=gen, dtype=torch.float64) for _ in range(3))
        attention(q, k, v)
        _write(w, slice(None), 8, how)
        assert (attention(q, k, v) - _dense(q, k, v, mask_mod)).abs().max() < 1e-10
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("how", WRITES)
def test_transformers_cached_block_mask_follows_unseen_writes(rng, how):
    """The transformers cache compares a CPU table's values too (.data and numpy writes kept the
    old window: 2.3 off)."""
    from flex_flash_infer.integrations.transformers import attention_forward, attention_mods

    L = 512
    windows = _table(400, L, how == "inference")   # full tiles (q 256..383 x kv 0..127) until written

    def per_row_window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < windows[q_idx])

    q, k, v = (torch.randn(1, 2, L, 16, generator=rng, dtype=torch.float64) for _ in range(3))
    module = types.SimpleNamespace(training=False, config=None, is_causal=True)
    with torch.no_grad(), attention_mods(mask_mod=per_row_window):
        attention_forward(module, q, k, v, None)
        _write(windows, slice(None), 4, how)
        got, _ = attention_forward(module, q, k, v, None)
    assert (got.transpose(1, 2) - _dense(q, k, v, per_row_window)).abs().max() < 1e-10


@pytest.mark.parametrize("how", ["data", "numpy"])
def test_prepared_reference_mask_table_written_unseen_raises(how):
    """FlexFlashInfer on the reference backend plans its tiles in prepare(): a table the mask_fn
    reads written through .data or numpy raises like an in-place write (it ran the old tiles:
    2.7 off)."""
    L, H, D = 256, 2, 16
    windows = torch.full((L,), 200)

    def mask_fn(q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < windows[q_idx])

    ffi = FlexFlashInfer(device="cpu", backend="reference").prepare(mask_fn, L, L, H, H, D, dtype=torch.float32)
    q, k, v = (torch.randn(L, H, D) for _ in range(3))
    ffi(q, k, v)
    _write(windows, slice(None), 4, how)
    with pytest.raises(ValueError, match="call prepare\\(\\) again"):
        ffi(q, k, v)


def test_a_table_padded_with_nan_keeps_what_was_built(monkeypatch):
    """Kept state compares a float table bit for bit: a NaN equals itself, so a mask reading a
    NaN-padded table keeps its torch conversion and pieces (rebuilt at every call before)."""
    from torch.nn.attention.flex_attention import create_block_mask as torch_create_block_mask

    from flex_flash_infer.backends import reference

    L = 1000
    pos = torch.arange(L, dtype=torch.float32)
    pos[-40:] = float("nan")   # padding: sees nothing, seen by none

    def mask_mod(b, h, q_idx, kv_idx):
        return pos[kv_idx] <= pos[q_idx]

    built = []
    make = reference._make_pieces
    monkeypatch.setattr(reference, "_make_pieces", lambda *a: built.append(1) or make(*a))
    torch_mask = torch_create_block_mask(mask_mod, None, None, L, L, device="cpu")
    q, k, v = (torch.randn(1, 2, L, 16, dtype=torch.float64) for _ in range(3))
    for _ in range(3):
        got = flex_attention(q, k, v, block_mask=torch_mask, backend="reference")
    assert len(built) == 1
    assert (got - _dense(q, k, v, mask_mod)).abs().max() < 1e-10


def test_settled_tiles_of_a_table_too_large_to_keep_follow_a_data_write(monkeypatch):
    """A table past the copy limit cannot be compared at each call: the torch BlockMask's last
    query tile is then not settled from it (torch's own tables), so a .data write is still read
    (it kept the old settled tiles: 0.21 off)."""
    from torch.nn.attention.flex_attention import create_block_mask as torch_create_block_mask

    from flex_flash_infer.core import versions

    monkeypatch.setattr(versions, "KEPT_VALUES_BYTES", 512)
    L = 1000
    rows = torch.ones(1024, dtype=torch.bool)   # 1 KiB: past the limit set above

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & rows[q_idx]

    torch_mask = torch_create_block_mask(mask_mod, None, None, L, L, device="cpu")
    q, k, v = (torch.randn(1, 2, L, 16, dtype=torch.float64) for _ in range(3))
    flex_attention(q, k, v, block_mask=torch_mask, backend="reference")
    rows.data[950:] = False
    got = flex_attention(q, k, v, block_mask=torch_mask, backend="reference")
    assert (got - _dense(q, k, v, mask_mod)).abs().max() < 1e-10


def test_transformers_untraceable_mask_is_built_once(monkeypatch):
    """A mask_mod that does not trace keeps its block mask per object, as flex_attention's plan
    does (it was built again at every layer call)."""
    from flex_flash_infer.integrations import transformers

    allowed = torch.tensor([0, 3, 5])

    def isin_mask(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & ~torch.isin(kv_idx, allowed)

    built = []
    make = transformers.create_block_mask
    monkeypatch.setattr(transformers, "create_block_mask", lambda *a, **kw: built.append(1) or make(*a, **kw))
    q = torch.randn(1, 2, 256, 16)
    module = types.SimpleNamespace(training=False, config=None, is_causal=True)
    with torch.no_grad(), transformers.attention_mods(mask_mod=isin_mask):
        for _ in range(3):
            transformers.attention_forward(module, q, q, q, None)
    assert len(built) == 1
