"""What calls and plans ask of a GPU, on the simulated CUDA device: a call never reads back to
the host or copies to the device (a read back waits for the GPU's queue and breaks CUDA-graph
capture; a host copy is a pageable, synchronising one), a band mask's prepare() neither, and a
decode step's plan() reads the tables back once."""
import sys

import pytest
import torch

import fake_flashinfer
from device_work import Counting
from flexfuzz.simulated import simulated
from flex_flash_infer import paged
from flex_flash_infer.backends import flashinfer_backend
from flex_flash_infer.mods import get_mask_fn
from flex_flash_infer.wrapper import FlexFlashInfer
from random_masks import per_head_starts


@pytest.fixture
def device(monkeypatch):
    monkeypatch.setitem(sys.modules, "flashinfer", fake_flashinfer.module())
    for module in (flashinfer_backend, paged):
        monkeypatch.setattr(module, "_is_hopper", lambda device: True)
    monkeypatch.setattr(paged, "unsupported_reason", lambda *a: None)
    with simulated():
        yield


class FakeEvent:
    """torch.cuda.Event on a CPU torch: counts its records, and notes which record the last
    synchronize() waited for (as CUDA's, a wait is for the latest record)."""
    made = []

    def __init__(self):
        self.records = self.waited_for = 0
        FakeEvent.made.append(self)

    def record(self):
        self.records += 1

    def synchronize(self):
        self.waited_for = self.records


@pytest.fixture
def queued(monkeypatch):
    """As on a CUDA build of torch: page-locked copies (a CPU torch cannot lock pages: a marked copy
    stands in) and CUDA events (FakeEvent)."""
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)

    def pinned(self, *args, **kwargs):
        if getattr(self, "_pinned_in_test", False):
            return self   # as torch's: an already page-locked tensor comes back itself
        copy = self.clone()
        copy._pinned_in_test = True
        return copy

    monkeypatch.setattr(torch.Tensor, "pin_memory", pinned)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: getattr(self, "_pinned_in_test", False))
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    FakeEvent.made.clear()
    return FakeEvent

def counted(fn):
    fn()   # the first call builds what later calls keep
    mode = Counting()
    with mode:
        fn()
    return mode


MASKS = {
    "causal": lambda: get_mask_fn("causal"),
    "sliding_window": lambda: get_mask_fn("sliding_window", window_size=64),
    "streaming": lambda: get_mask_fn("streaming", sink_size=4, window_size=64),
    "attamba": lambda: get_mask_fn("attamba", window_size=64, chunk_size=32),
    "prefix_lm": lambda: get_mask_fn("prefix_lm", prefix_len=100),
    "document": lambda: get_mask_fn("document", document_ids=torch.arange(384).div(100, rounding_mode="floor")
                                     .to("cuda")),
    "per_head_windows": lambda: lambda b, h, q, kv: (kv <= q) & (q - kv < 32 * (h + 1)),
    "random_tiles": lambda: lambda b, h, q, kv: (kv <= q) & (((q // 128) * 7 + (kv // 128) * 3) % 4 != 1),
    "per_head_starts": lambda: per_head_starts,
}


@pytest.mark.parametrize("name", list(MASKS))
def test_a_call_never_reads_back_or_copies_to_the_device(device, name):
    S, Hq, Hkv, D = 384, 4, 2, 64
    flex = FlexFlashInfer(device="cuda", backend="flashinfer")
    flex.prepare(mask_fn=MASKS[name](), seq_len_q=S, seq_len_kv=S, num_qo_heads=Hq, num_kv_heads=Hkv, head_dim=D,
                 dtype=torch.bfloat16)
    q = torch.randn(S, Hq, D, dtype=torch.bfloat16).to("cuda")
    k, v = (torch.randn(S, Hkv, D, dtype=torch.bfloat16).to("cuda") for _ in range(2))
    for return_lse in (False, True):
        mode = counted(lambda: flex(q, k, v, return_lse=return_lse))
        assert not mode.reads and not mode.to_device, (name, return_lse, mode.reads, mode.to_device)
    if name in ("causal", "sliding_window", "prefix_lm"):
        # a band mask's plan comes from its hint and a probe of the mask_mod on a small grid made
        # on the device (a host copy there would wait for the GPU's queue)
        mask = MASKS[name]()
        prepare = counted(lambda: flex.prepare(mask_fn=mask, seq_len_q=S, seq_len_kv=S, num_qo_heads=Hq,
                                               num_kv_heads=Hkv, head_dim=D, dtype=torch.bfloat16))
        assert not prepare.to_device and not prepare.reads, (name, prepare.to_device, prepare.reads)


def decode_step(seed: int, pages_per: int = 6, last: int = 7, R: int = 8, page: int = 16, Hq: int = 4, Hkv: int = 2,
                D: int = 64):
    """A decode step of R requests of pages_per shuffled pages (the last holding `last` keys): its
    host tables (qo_indptr, kv_page_indptr, kv_page_indices, kv_last_page_len), the same with the
    page ids on the GPU (as a server keeps them), the cache and the queries on the GPU."""
    host = (torch.arange(R + 1, dtype=torch.int32), torch.arange(R + 1, dtype=torch.int32) * pages_per,
            torch.randperm(R * pages_per, generator=torch.Generator().manual_seed(seed)).to(torch.int32),
            torch.full((R,), last, dtype=torch.int32))
    mixed = (host[0], host[1], host[2].to("cuda"), host[3])
    cache = tuple(torch.randn(R * pages_per, page, Hkv, D, dtype=torch.bfloat16).to("cuda") for _ in range(2))
    q = torch.randn(R, Hq, D, dtype=torch.bfloat16).to("cuda")
    return host, mixed, cache, q, (Hq, Hkv, D, page)


@pytest.mark.parametrize("name", ["causal", "sliding_window", "streaming"])
def test_a_decode_step_plans_with_one_read_back_and_runs_with_none(device, name):
    R, pages_per, page, Hq, Hkv, D = 8, 6, 16, 4, 2, 64
    tables = (torch.arange(R + 1, dtype=torch.int32).to("cuda"),
              (torch.arange(R + 1, dtype=torch.int32) * pages_per).to("cuda"),
              torch.randperm(R * pages_per, generator=torch.Generator().manual_seed(0)).to(torch.int32).to("cuda"),
              torch.full((R,), 5, dtype=torch.int32).to("cuda"))
    cache = tuple(torch.randn(R * pages_per, page, Hkv, D, dtype=torch.bfloat16).to("cuda") for _ in range(2))
    q = torch.randn(R, Hq, D, dtype=torch.bfloat16).to("cuda")
    ours = paged.PagedFlexAttention(device="cuda", backend="flashinfer")
    mask = MASKS[name]()
    planned = counted(lambda: ours.plan(mask, *tables, Hq, Hkv, D, page, dtype=torch.bfloat16))
    assert sum(planned.reads.values()) == 1, planned.reads   # the small tables, read once
    launches = {}
    for return_lse in (False, True):
        run = counted(lambda: ours.run(q, cache, return_lse=return_lse))
        assert not run.reads and not run.to_device, (return_lse, run.reads, run.to_device)
        launches[return_lse] = sum(run.device_ops.values())
    # without the LSE asked for, the decode kernel's LSE repair (and the scaling) do not run
    assert launches[False] < launches[True], launches


@pytest.mark.parametrize("name", ["causal", "sliding_window", "streaming"])
def test_a_decode_step_with_host_tables_copies_none_of_them_over(device, name):
    """FlashInfer's own plan() asks for the per-request tables on the host: a caller who keeps them
    there gets a plan that copies none of them to the device (only the page ids' range comes
    back), and the same output as with the tables on the device."""
    host, mixed, cache, q, (Hq, Hkv, D, page) = decode_step(seed=1)
    on_device = tuple(t.to("cuda") for t in host)
    mask = MASKS[name]()
    outs, counts = {}, {}
    for kind, tables in (("device", on_device), ("host", mixed)):
        ours = paged.PagedFlexAttention(device="cuda", backend="flashinfer")
        counts[kind] = counted(lambda: ours.plan(mask, *tables, Hq, Hkv, D, page, dtype=torch.bfloat16))
        outs[kind] = ours.run(q, cache).float().cpu()
    assert sum(counts["host"].reads.values()) == 1, counts["host"].reads    # the page ids' range
    assert sum(counts["host"].to_device.values()) == sum(counts["device"].to_device.values()), (
        counts["host"].to_device, counts["device"].to_device)
    assert torch.equal(outs["host"], outs["device"])
    assert torch.isfinite(outs["host"]).all()


@pytest.mark.parametrize("name", ["causal", "sliding_window", "streaming"])
def test_page_ids_on_the_host_or_unchecked_cost_no_wait_for_the_gpu(device, queued, name):
    """The page ids' range is the only read back of a decode step whose per-request tables lie on
    the host: ids given on the host are checked there (before they go over), and check_page_ids=False
    leaves ids on the GPU unread. Either way no wait for the GPU, and the same output; a bad host id
    still raises by name, and an unchecked plan cannot check the ids against the cache at run()."""
    host, mixed, cache, q, (Hq, Hkv, D, page) = decode_step(seed=2, last=9)
    mask = MASKS[name]()
    outs = {}
    for kind, tables, check in (("checked", mixed, True), ("host ids", host, True), ("unchecked", mixed, False)):
        ours = paged.PagedFlexAttention(device="cuda", backend="flashinfer", check_page_ids=check)
        planned = counted(lambda: ours.plan(mask, *tables, Hq, Hkv, D, page, dtype=torch.bfloat16))
        assert sum(planned.reads.values()) == (kind == "checked"), (kind, planned.reads)
        assert not planned.waiting_copies, (kind, planned.waiting_copies)
        outs[kind] = ours.run(q, cache).float().cpu()
        assert torch.isfinite(outs[kind]).all(), kind
        small = tuple(c[:-1] for c in cache)   # one page short of the ids
        if kind == "unchecked":
            assert ours._planned["plan"].max_page_id == -1
        else:
            with pytest.raises(ValueError, match="kv_cache has 47 pages"):
                ours.run(q, small)
    assert torch.equal(outs["host ids"], outs["checked"]) and torch.equal(outs["unchecked"], outs["checked"])
    ours = paged.PagedFlexAttention(device="cuda", backend="flashinfer")
    bad = (host[0], host[1], torch.cat([host[2][:-1], torch.tensor([-3], dtype=torch.int32)]), host[3])
    with pytest.raises(ValueError, match="kv_page_indices must be non-negative"):
        ours.plan(mask, *bad, Hq, Hkv, D, page, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="check_page_ids must be True or False"):
        paged.PagedFlexAttention(device="cuda", check_page_ids=1)


@pytest.mark.parametrize("name", ["causal", "sliding_window", "streaming"])
def test_an_unchecked_decode_plan_never_waits_for_the_gpu(device, queued, name):
    """With the per-request tables on the host and check_page_ids=False, a decode step's plan()
    neither reads back nor copies to the device in a way that waits: its tables go over from
    page-locked memory, queued (core/transfers.py), so a server's plan() overlaps the step before."""
    # 70 pages a request: windows of 64 list the last 5
    _, tables, cache, q, (Hq, Hkv, D, page) = decode_step(seed=3, pages_per=70, last=11)
    mask = MASKS[name]()
    ours = paged.PagedFlexAttention(device="cuda", backend="flashinfer", check_page_ids=False)
    planned = counted(lambda: ours.plan(mask, *tables, Hq, Hkv, D, page, dtype=torch.bfloat16))
    assert not planned.reads and not planned.waiting_copies, (planned.reads, planned.waiting_copies)
    assert sum(planned.to_device.values()) == {"causal": 0, "sliding_window": 1, "streaming": 3}[name]
    out = ours.run(q, cache).float().cpu()
    checked = paged.PagedFlexAttention(device="cuda", backend="flashinfer")
    checked.plan(mask, *tables, Hq, Hkv, D, page, dtype=torch.bfloat16)
    assert torch.equal(out, checked.run(q, cache).float().cpu()) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["causal", "sliding_window", "streaming"])
def test_a_wrapper_is_planned_again_only_after_its_last_plan_was_copied(device, queued, name):
    """FlashInfer's plan() queues the copy of its page-locked schedule with nothing holding the
    buffer: a plan() that does not wait for the GPU must not rewrite it before that copy ran (the
    step before would read this step's schedule). Each wrapper's plan marks its copy; the next
    plan() of that wrapper waits for that mark, and for nothing else, before FlashInfer plans."""
    host, mixed, cache, q, (Hq, Hkv, D, page) = decode_step(seed=4, pages_per=70, last=5)
    mask = MASKS[name]()
    ours = paged.PagedFlexAttention(device="cuda", backend="flashinfer", check_page_ids=False)
    ours.plan(mask, *mixed, Hq, Hkv, D, page, dtype=torch.bfloat16)
    first = ours.run(q, cache).float().cpu()
    wrappers = [w for w in ours._planned["launches"][:2] if w is not None]
    marks = {id(w): w._ffi_plan_copied for w in wrappers}
    assert wrappers and all(m.records == 1 and m.waited_for == 0 for m in marks.values())
    seen = []
    for w in wrappers:   # what FlashInfer's plan() finds when it is called again
        plan = w.plan

        def checking(*args, _w=w, _plan=plan, **kwargs):
            mark = marks[id(_w)]
            seen.append((mark.records, mark.waited_for))
            return _plan(*args, **kwargs)
        w.plan = checking
    ours.plan(mask, *mixed, Hq, Hkv, D, page, dtype=torch.bfloat16)
    # the first plan's copy was waited for before FlashInfer planned again, then the second's marked
    assert seen == [(1, 1)] * len(wrappers), seen
    assert all(w._ffi_plan_copied.records == 2 and w._ffi_plan_copied.waited_for == 1 for w in wrappers)
    assert torch.equal(ours.run(q, cache).float().cpu(), first)


def test_the_reference_backend_checks_unchecked_page_ids_at_run(device):
    """check_page_ids=False leaves device ids unread at plan(); the reference backend, which reads
    its tables back anyway, checks them at run(): a negative id would wrap to a page from the end."""
    host, mixed, cache, q, (Hq, Hkv, D, page) = decode_step(seed=5)
    ids = host[2].clone()
    for bad, message in ((-2, "must be non-negative"), (len(ids) + 3, f"kv_cache has {len(ids)} pages")):
        ids[3] = bad
        ours = paged.PagedFlexAttention(device="cuda", backend="reference", check_page_ids=False)
        ours.plan(None, host[0], host[1], ids.to("cuda"), host[3], Hq, Hkv, D, page, dtype=torch.bfloat16)
        with pytest.raises(ValueError, match=message):
            ours.run(q, cache)
    ours.plan(None, *mixed, Hq, Hkv, D, page, dtype=torch.bfloat16)   # still usable
    assert torch.isfinite(ours.run(q, cache)).all()


def test_a_callers_page_locked_table_is_copied_before_its_queued_copy(device, queued):
    """pin_memory() hands back a tensor that is already page-locked: the queued copy would read the
    caller's buffer after plan() returned (a server writes its next step there). Its ids are staged
    in a copy of the library's own first."""
    from flex_flash_infer.core.transfers import to_device_queued

    caller = torch.arange(12, dtype=torch.int32)
    caller._pinned_in_test = True
    sources = []
    original = torch.Tensor.to

    def spy(self, *args, **kwargs):
        sources.append(self)
        return original(self, *args, **kwargs)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(torch.Tensor, "to", spy)
        to_device_queued(caller, "cuda")
    assert sources and all(s is not caller for s in sources)
