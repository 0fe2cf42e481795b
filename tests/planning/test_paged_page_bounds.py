"""A paged plan decides most pages from the traced mask's bounds over each page's positions
(paged_plan._bounded_states) and evaluates only the rest; its plan must be exactly the plan of
evaluating every page, on random mask expressions and random page tables (requests without
queries, chunked prefill, decode, one or several heads), and must leave few pages to evaluate on a
decode step of the masks a server runs."""
import random

import pytest
import torch

from flex_flash_infer.mods import get_mask_fn
from flex_flash_infer.planning import paged_plan
from flex_flash_infer.planning.paged_plan import plan_paged
from random_masks import random_bool_expression, random_table


def random_tables(r: random.Random, rng):
    requests = r.randint(1, 4)
    page_size = r.choice([1, 4, 16])
    kv_lens = [r.choice([0, r.randint(1, 40), r.randint(1, 400)]) for _ in range(requests)]
    qo_lens = [0 if n == 0 else r.choice([0, 1, 1, r.randint(1, n)]) for n in kv_lens]
    pages = [-(-n // page_size) for n in kv_lens]
    last = torch.tensor([n - (p - 1) * page_size if p else 0 for n, p in zip(kv_lens, pages)])
    indices = torch.randperm(sum(pages) + 2, generator=rng)[:sum(pages)]
    return (torch.tensor([0] + qo_lens).cumsum(0), torch.tensor([0] + pages).cumsum(0), indices, last, page_size)


def assert_same_plan(a, b, source):
    assert torch.equal(a.page_states, b.page_states), source
    assert a.decode == b.decode, source
    for x, y in ((a.full, b.full), (a.partial, b.partial)):
        assert (x is None) == (y is None), source
        if x is None:
            continue
        for name in ("kv_indptr", "kv_indices", "last_page_len", "mask", "kv_positions"):
            u, v = getattr(x, name), getattr(y, name)
            assert (u is None and v is None) or torch.equal(u, v), (name, source)
        assert (x.causal, x.window_left) == (y.causal, y.window_left), source


@pytest.mark.parametrize("seed", range(60))
def test_pages_decided_by_bounds_plan_as_evaluating_every_page(monkeypatch, rng, seed):
    r = random.Random(int(torch.randint(0, 2**31, (1,), generator=rng)) + seed)
    source = random_bool_expression(r, 4)
    names = {"torch": torch, "T": torch.rand(12, 12, generator=rng) < 0.5, "D": random_table(r, rng),
             "w": r.randint(0, 600)}
    mask_mod = eval(f"lambda b, h, q, kv: ({source}) | (q < 0)", names)
    tables = random_tables(r, rng)
    heads = r.choice([1, 3])
    by_bounds = plan_paged(mask_mod, *tables, "cpu", heads=heads)
    monkeypatch.setattr(paged_plan, "_bounded_states", lambda *args: None)
    evaluated = plan_paged(mask_mod, *tables, "cpu", heads=heads)
    assert_same_plan(by_bounds, evaluated, source)


@pytest.mark.parametrize("name,params,most", [
    ("streaming", {"sink_size": 4, "window_size": 100}, 2),      # the sink's page and the window's edge
    ("document", {"offsets": [0, 1000, 1500, 2048]}, 1),          # the page the last boundary crosses
    ("attamba", {"window_size": 100, "chunk_size": 64}, 2048 // 64),   # one key column per chunk
])
def test_a_decode_step_evaluates_only_the_pages_at_a_masks_edges(monkeypatch, name, params, most):
    page, requests, kv_len = 16, 8, 2048
    pages = kv_len // page
    evaluated = []
    classify = paged_plan._classify
    monkeypatch.setattr(paged_plan, "_classify", lambda mod, req, *a: evaluated.append(req.numel()) or
                        classify(mod, req, *a))
    plan_paged(get_mask_fn(name, **params), torch.arange(requests + 1), torch.arange(requests + 1) * pages,
               torch.arange(requests * pages), torch.full((requests,), page), page, "cpu")
    assert sum(evaluated) <= most * requests, evaluated


@pytest.mark.parametrize("seed", range(4))
def test_pages_of_requests_lists_each_requests_pages_in_order(seed):
    """The per-page lists of a plan from flags (numpy, since torch's CPU indexing stalled on a busy
    host): request r's pages first[r] .. first[r] + counts[r] - 1, requests in order, none for 0."""
    from flex_flash_infer.planning.paged_plan import pages_of_requests

    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 6, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen)
    first = torch.randint(0, 40, counts.shape, generator=gen)
    req, local = pages_of_requests(counts, first)
    want = [(r, first[r].item() + i) for r in range(counts.numel()) for i in range(counts[r].item())]
    assert req.dtype == local.dtype == torch.int64
    assert list(zip(req.tolist(), local.tolist())) == want
