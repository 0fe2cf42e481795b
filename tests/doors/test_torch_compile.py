"""flex_attention inside a function compiled by torch.compile: the same output and gradients as
eager (torch.compile runs it outside its graphs), and with fullgraph=True an error that says so
rather than one about data-dependent SymInts in the library's internals."""
import pytest
import torch

from flex_flash_infer import create_block_mask, flex_attention


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _inputs(rng, B=1, Hq=4, Hkv=2, L=70, S=90, D=16):
    make = lambda *shape: torch.randn(*shape, generator=rng, dtype=torch.float64).float().requires_grad_()  # noqa: E731
    return make(B, Hq, L, D), make(B, Hkv, S, D), make(B, Hkv, S, D)


def test_compiled_function_matches_eager_with_gradients(rng):
    torch._dynamo.reset()
    q, k, v = _inputs(rng)
    table = torch.randn(4, generator=rng).requires_grad_()
    block_mask = create_block_mask(causal, None, None, 70, 90, device="cpu", BLOCK_SIZE=32)

    def attend(q, k, v):
        out, lse = flex_attention(q, k, v, score_mod=lambda s, b, h, qi, ki: s + table[h] * (qi - ki) * 0.1,
                                  block_mask=block_mask, enable_gqa=True, return_lse=True)
        return out * 2, lse

    results = []
    for fn in (attend, torch.compile(attend, backend="eager")):
        out, lse = fn(q, k, v)
        grads = torch.autograd.grad(out.sum() + lse.sum(), (q, k, v, table))
        results.append((out, lse, *grads))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_fullgraph_compile_says_flex_attention_runs_outside_the_graph(rng):
    torch._dynamo.reset()
    q, k, v = (t.detach() for t in _inputs(rng))
    block_mask = create_block_mask(causal, None, None, 70, 90, device="cpu", BLOCK_SIZE=32)
    compiled = torch.compile(lambda q, k, v: flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True),
                             backend="eager", fullgraph=True)
    with pytest.raises(Exception, match="flex_attention runs outside torch.compile's graphs"):
        compiled(q, k, v)


def test_create_block_mask_under_fullgraph_compile_says_it_runs_outside_the_graph():
    torch._dynamo.reset()
    compiled = torch.compile(lambda n: create_block_mask(causal, None, None, n, n, device="cpu"), backend="eager",
                             fullgraph=True)
    with pytest.raises(Exception, match="create_block_mask runs outside torch.compile's graphs"):
        compiled(300)
    # without fullgraph: the same mask as eager
    torch._dynamo.reset()
    compiled = torch.compile(lambda n: create_block_mask(causal, None, None, n, n, device="cpu"), backend="eager")
    assert torch.equal(compiled(300).to_dense(), create_block_mask(causal, None, None, 300, 300, device="cpu").to_dense())


def test_fullgraph_says_why_when_compiled_before_any_eager_call():
    """In a fresh process whose first call of flex_attention is under fullgraph compile, the error
    still names why (the front door is marked when defined, not at a first eager call)."""
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from flex_flash_infer import create_block_mask, flex_attention\n"
        "bm = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, 64, 64, device='cpu', BLOCK_SIZE=32)\n"
        "q = torch.randn(1, 2, 64, 16)\n"
        "f = torch.compile(lambda q: flex_attention(q, q, q, block_mask=bm), backend='eager', fullgraph=True)\n"
        "try:\n"
        "    f(q)\n"
        "except Exception as e:\n"
        "    print('ERROR', str(e))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "ERROR" in done.stdout, done.stderr[-2000:]
    assert "flex_attention runs outside torch.compile's graphs" in done.stdout
