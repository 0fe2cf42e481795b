"""The library's masks, score_mods and BlockMask inside torch.compile around torch's own
flex_attention (a hunt of the two libraries mixed, each test failing without its fix)."""
import torch
from torch.nn.attention.flex_attention import create_block_mask as torch_create_block_mask
from torch.nn.attention.flex_attention import flex_attention as torch_flex_attention

import flex_flash_infer as ffi
from flex_flash_infer import mods

L = 128


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, L, 16, generator=gen) for _ in range(3)]


def test_a_factory_called_inside_a_compiled_function_compiles():
    """A mod made while dynamo traced registered its planner hint in a weak registry, whose
    replay raised "weak object has gone away": the whole compiled forward failed."""
    q, k, v = _inputs()
    table = torch.randn(2, 33)

    def forward(q, k, v):
        block_mask = torch_create_block_mask(mods.generate_sliding_window_mask_mod(16), None, None, L, L,
                                             device="cpu")
        return torch_flex_attention(q, k, v, block_mask=block_mask,
                                    score_mod=mods.generate_relative_position_bias_score_mod(table))

    torch._dynamo.reset()
    compiled = torch.compile(forward, backend="eager", fullgraph=True)(q, k, v)
    assert torch.allclose(compiled, forward(q, k, v), atol=1e-5)


def test_the_librarys_block_mask_is_one_graph_in_torchs_compiled_flex_attention():
    """as_tuple read write counters while dynamo traced: fullgraph failed, and otherwise the graph
    broke twice and the torch twin was rebuilt at every call."""
    q, k, v = _inputs()
    block_mask = ffi.create_block_mask(ffi.get_mask_fn("sliding_window", window_size=45), None, None, L, L,
                                       device="cpu", BLOCK_SIZE=32)
    eager = torch_flex_attention(q, k, v, block_mask=block_mask)   # the twin is made here
    torch._dynamo.reset()
    explained = torch._dynamo.explain(torch_flex_attention)(q, k, v, block_mask=block_mask)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = torch.compile(torch_flex_attention, backend="eager", fullgraph=True)(q, k, v, block_mask=block_mask)
    assert torch.allclose(compiled, eager, atol=1e-5)


def test_a_document_mask_made_inside_a_compiled_function_breaks_no_graph():
    """Its name read the ids' maximum (a data-dependent .item()) and broke the graph three times."""
    q, k, v = _inputs()
    ids = torch.arange(L) // 40

    def forward(q, k, v):
        block_mask = torch_create_block_mask(mods.generate_document_mask_mod(document_ids=ids), None, None, L, L,
                                             device="cpu")
        return torch_flex_attention(q, k, v, block_mask=block_mask)

    torch._dynamo.reset()
    assert torch._dynamo.explain(forward)(q, k, v).graph_break_count == 0
