"""PagedFlexAttention(use_cuda_graph=True) on the CPU model of FlashInfer: run() captured once
(fake_flashinfer.capture, which replays each launch with the numbers it was launched with and the
tables it reads as they hold at replay, as a CUDA graph does), then each later decode step planned
and replayed, against the reference backend in float32. Without use_cuda_graph the same replay
gives the first step's answer: what the model catches."""
import pytest
import torch

import fake_flashinfer
from dense_reference import rel_err
from flex_flash_infer import PagedFlexAttention, get_mask_fn
from flex_flash_infer.mods import generate_softcap_score_mod

PAGE, HQ, HKV, D = 16, 8, 2, 32


class Server:
    """Decode steps of R requests, each one token longer than the step before; a request whose
    last page is full takes a free page from a shuffled pool."""

    def __init__(self, gen, kv_lens, num_pages=64, dtype=torch.bfloat16):
        self.gen, self.lens = gen, list(kv_lens)
        pool = torch.randperm(num_pages, generator=gen).tolist()
        self.pages = [[pool.pop() for _ in range(-(-n // PAGE))] for n in self.lens]
        self.pool = pool
        self.cache = tuple(torch.randn(num_pages, PAGE, HKV, D, generator=gen).to(dtype) for _ in range(2))
        self.dtype = dtype

    def advance(self):
        for r, n in enumerate(self.lens):
            if n % PAGE == 0:
                self.pages[r].append(self.pool.pop())
            self.lens[r] = n + 1

    def tables(self):
        counts = [len(p) for p in self.pages]
        return (torch.arange(len(self.lens) + 1, dtype=torch.int32),
                torch.tensor([0] + counts, dtype=torch.int32).cumsum(0).to(torch.int32),
                torch.tensor([i for p in self.pages for i in p], dtype=torch.int32),
                torch.tensor([n - (len(p) - 1) * PAGE for n, p in zip(self.lens, self.pages)], dtype=torch.int32))

    def queries(self):
        return torch.randn(len(self.lens), HQ, D, generator=self.gen).to(self.dtype)

    def captured(self, mask, max_num_pages=64):
        """A graph-mode PagedFlexAttention planned on this step, its queries and run() captured:
        (the object, the captured q, the capture, its output)."""
        ours = PagedFlexAttention(device="cpu", backend="flashinfer", use_cuda_graph=True, max_num_pages=max_num_pages)
        ours.plan(mask, *self.tables(), HQ, HKV, D, PAGE, dtype=torch.bfloat16)
        q = self.queries()
        with fake_flashinfer.capture() as graph:
            out = ours.run(q, self.cache)
        return ours, q, graph, out

    def reference(self, mask, q, score_mod=None, return_lse=False):
        ref = PagedFlexAttention(device="cpu", backend="reference")
        ref.plan(mask, *self.tables(), HQ, HKV, D, PAGE, dtype=torch.float32, score_mod=score_mod)
        return ref.run(q.float(), tuple(c.float() for c in self.cache), return_lse=return_lse)


def streaming():
    return get_mask_fn("streaming", sink_size=4, window_size=40)


# (mask, score_mod, the requests' first lengths); streaming's short requests see every sink inside
# their windows at first (no sink page needed: the masked launch lists hidden keys only), then not
CASES = {"causal": (lambda: get_mask_fn("causal"), None, [15, 40, 100]),
         "sliding_window": (lambda: get_mask_fn("sliding_window", window_size=40), None, [15, 40, 100]),
         "full": (lambda: get_mask_fn("full"), None, [15, 40, 100]),
         "softcap": (lambda: get_mask_fn("causal"), lambda: generate_softcap_score_mod(20.0), [15, 40, 100]),
         "streaming": (streaming, None, [15, 40, 100]),
         "streaming_from_short": (streaming, lambda: generate_softcap_score_mod(20.0), [3, 20, 30]),
         # a negative factor folds into the scale, and run() negates the query: an operator in the graph
         "negative_scale": (lambda: get_mask_fn("causal"), lambda: lambda score, b, h, q, kv: score * -0.5,
                            [15, 40, 100])}


@pytest.mark.parametrize("use_tensor_cores", [True, False])
@pytest.mark.parametrize("name", list(CASES))
def test_a_graph_captured_once_replays_every_later_decode_step(flashinfer_on_cpu, rng, name, use_tensor_cores):
    make_mask, make_score, lens = CASES[name]
    mask, score_mod = make_mask(), make_score() if make_score else None
    server = Server(rng, lens)
    ours = PagedFlexAttention(device="cpu", backend="flashinfer", use_cuda_graph=True, max_num_pages=64,
                              use_tensor_cores=use_tensor_cores)
    ours.plan(mask, *server.tables(), HQ, HKV, D, PAGE, dtype=torch.bfloat16, score_mod=score_mod)
    q = server.queries()   # the graph's input: each step writes its queries here
    with fake_flashinfer.capture() as graph:
        out, lse = ours.run(q, server.cache, return_lse=True)
    assert rel_err(out.float(), server.reference(mask, q, score_mod)) < 1e-2
    for step in range(34):   # pages fill and new ones are taken (every request crosses one)
        server.advance()
        ours.plan(mask, *server.tables(), HQ, HKV, D, PAGE, dtype=torch.bfloat16, score_mod=score_mod)
        q.copy_(server.queries())
        graph.replay()
        ref, ref_lse = server.reference(mask, q, score_mod, return_lse=True)
        assert torch.isfinite(out).all() and rel_err(out.float(), ref) < 1e-2, step
        assert torch.allclose(lse, ref_lse, atol=1e-2, rtol=1e-3), step


def test_without_use_cuda_graph_a_replay_runs_the_captured_step(flashinfer_on_cpu, rng):
    """The negative control: the default plan makes new tables at each plan(), so a graph captured
    before reads the old ones (the README says: capture again after each plan() then)."""
    mask = get_mask_fn("causal")
    server = Server(rng, [15, 40, 100])
    ours = PagedFlexAttention(device="cpu", backend="flashinfer")
    ours.plan(mask, *server.tables(), HQ, HKV, D, PAGE, dtype=torch.bfloat16)
    q = server.queries()
    with fake_flashinfer.capture() as graph:
        out = ours.run(q, server.cache)
    first = out.clone()
    server.advance()
    ours.plan(mask, *server.tables(), HQ, HKV, D, PAGE, dtype=torch.bfloat16)
    graph.replay()
    assert torch.equal(out, first)
    assert rel_err(out.float(), server.reference(mask, q)) > 1e-2


def test_a_step_the_graph_cannot_replay_raises_and_the_graph_keeps_the_last_step(flashinfer_on_cpu, rng):
    mask = get_mask_fn("sliding_window", window_size=40)
    server = Server(rng, [15, 40, 100])
    ours, q, graph, out = server.captured(mask, max_num_pages=10)
    want = server.reference(mask, q)
    tables = server.tables()
    other = Server(rng, [15, 40])   # another batch size
    bad = [
        (lambda: ours.plan(mask, *other.tables(), HQ, HKV, D, PAGE, dtype=torch.bfloat16), "requests 3 -> 2"),
        (lambda: ours.plan(get_mask_fn("sliding_window", window_size=64), *tables, HQ, HKV, D, PAGE,
                           dtype=torch.bfloat16), r"window \(window_left\) 39 -> 63"),
        (lambda: ours.plan(mask, *tables, HQ, HKV, D, PAGE, dtype=torch.float16), "dtype"),
        (lambda: ours.plan(mask, *tables, HQ, HKV, D, PAGE, dtype=torch.bfloat16, scale=0.5), "scale"),
        (lambda: ours.plan(streaming(), *tables, HQ, HKV, D, PAGE, dtype=torch.bfloat16),
         r"masked launch \(a streaming mask's sinks\) False -> True"),
        (lambda: ours.plan(lambda b, h, q, kv: (q // 37 == kv // 37) & (q >= kv), *tables, HQ, HKV, D, PAGE,
                           dtype=torch.bfloat16), "a mask evaluated page by page"),
        (lambda: ours.plan(mask, *tables, HQ, HKV, D, PAGE, dtype=torch.bfloat16,
                           score_mod=lambda score, b, h, q, kv: score + 0.01 * (q - kv)), "a compiled score_mod"),
        (lambda: ours.plan(mask, torch.tensor([0, 1, 3, 4], dtype=torch.int32), *tables[1:], HQ, HKV, D, PAGE,
                           dtype=torch.bfloat16), "more than one query"),
    ]
    full = PagedFlexAttention(device="cpu", backend="flashinfer", use_cuda_graph=True, max_num_pages=10)
    bad.append((lambda: full.plan(get_mask_fn("causal"), *tables, HQ, HKV, D, PAGE, dtype=torch.bfloat16),
                r"lists 10 pages|lists 1[1-9] pages"))
    for call, message in bad:
        with pytest.raises(ValueError, match=message):
            call()
        out.zero_()
        graph.replay()   # the buffers still hold the last good step
        assert rel_err(out.float(), want) < 1e-2, message
    assert ours.run(q, server.cache).shape == q.shape   # and the object still runs it


def test_use_cuda_graph_arguments_are_checked():
    with pytest.raises(ValueError, match="needs max_num_pages"):
        PagedFlexAttention(device="cpu", use_cuda_graph=True)
    with pytest.raises(ValueError, match="pass use_cuda_graph=True too"):
        PagedFlexAttention(device="cpu", max_num_pages=8)
    with pytest.raises(TypeError, match="use_cuda_graph must be True or False"):
        PagedFlexAttention(device="cpu", use_cuda_graph=1, max_num_pages=8)
    with pytest.raises(ValueError, match="max_num_pages must be a positive int"):
        PagedFlexAttention(device="cpu", use_cuda_graph=True, max_num_pages=0)


def test_use_cuda_graph_on_the_reference_backend_says_why(rng):
    server = Server(rng, [15, 40])
    ours = PagedFlexAttention(device="cpu", backend="reference", use_cuda_graph=True, max_num_pages=8)
    with pytest.raises(ValueError, match="replays FlashInfer's kernels, but this plan runs on the reference backend"):
        ours.plan(None, *server.tables(), HQ, HKV, D, PAGE, dtype=torch.bfloat16)


@pytest.mark.parametrize("tables_on", ["cpu", "cuda"])
def test_on_a_simulated_gpu_every_table_the_graph_reads_lies_on_it(monkeypatch, tables_on):
    """tests/simulated_cuda.py: the buffers a graph reads, and the page ids FlashInfer copies into
    them without a wait, must lie on the GPU whether the caller keeps its tables on the host or on
    the GPU (the CPU model of FlashInfer's CUDA-graph plan checks both)."""
    from flexfuzz.cpu_model import patched
    from simulated_cuda import simulated_cuda

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gen = torch.Generator().manual_seed(3)
    server = Server(gen, [15, 40, 100], dtype=torch.float32)
    mask = get_mask_fn("sliding_window", window_size=40)
    with simulated_cuda():
        cache = tuple(c.to("cuda") for c in server.cache)
        q = server.queries().to("cuda")
        with patched({}, cpu_model=True):
            ours = PagedFlexAttention(device="cuda", backend="flashinfer", use_cuda_graph=True, max_num_pages=64)
            for step in range(18):
                tables = tuple(t.to(tables_on) for t in server.tables())
                ours.plan(mask, *tables, HQ, HKV, D, PAGE, dtype=torch.float32)
                q.copy_(server.queries().to("cuda"))
                if step == 0:
                    with fake_flashinfer.capture() as graph:
                        out = ours.run(q, cache)
                else:
                    graph.replay()
                assert out.device.type == "cuda"
                want = server.reference(mask, q.cpu())
                assert (out.cpu() - want).abs().max().item() < 1e-4, step
                server.advance()


def test_a_plan_that_fails_inside_flashinfer_keeps_the_graphs_buffers(flashinfer_on_cpu, rng, monkeypatch):
    """FlashInfer's plan() may have written part of the buffers when it fails: no plan runs until
    the next (run() raises), and the next plan() rewrites the same buffers, so the graph captured
    before replays it."""
    mask = get_mask_fn("causal")
    server = Server(rng, [15, 40, 100])
    ours, q, graph, out = server.captured(mask)
    wrappers = dict(ours._wrappers)
    server.advance()
    decode = fake_flashinfer.BatchDecodeWithPagedKVCacheWrapper
    original = decode.plan

    def failing(self, *args, **kwargs):
        raise RuntimeError("interrupted")
    monkeypatch.setattr(decode, "plan", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        ours.plan(mask, *server.tables(), HQ, HKV, D, PAGE, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="before plan"):
        ours.run(q, server.cache)
    monkeypatch.setattr(decode, "plan", original)
    ours.plan(mask, *server.tables(), HQ, HKV, D, PAGE, dtype=torch.bfloat16)
    assert ours._wrappers == wrappers   # the same wrappers, so the same buffers the graph reads
    q.copy_(server.queries())
    graph.replay()
    assert rel_err(out.float(), server.reference(mask, q)) < 1e-2
