"""A library mod's table follows the device of the indices reading it; a copy on another device
is made again after the table is written in place (a learned bias after an optimizer step), so
the reference backend and the backward never read a stale copy."""
import torch

from flex_flash_infer.mods._captured import follow_device


def test_a_copy_on_another_device_follows_in_place_writes():
    table = torch.arange(6.0)
    on = follow_device(table)
    assert on(table.device) is table
    first = on("meta")   # another device: a copy, made once while the table is unchanged
    assert first.device.type == "meta" and on("meta") is first
    with torch.no_grad():
        table.add_(1.0)
    assert on("meta") is not first and on(table.device) is table


def test_library_mods_reading_a_table_on_another_device_trace_whole_under_torch_compile():
    """torch's own flex_attention compiles the mod: a graph break there sends it to its unfused
    path (the whole score matrix: 50-100x slower, out of memory at 32768 tokens). Under tracing
    the copy is part of the graph (never stale), with no bookkeeping (a weakref broke the graph)."""
    from flex_flash_infer import get_mask_fn
    from flex_flash_infer.mods import (generate_alibi_score_mod, generate_relative_position_bias_score_mod,
                                       generate_t5_relative_bias_score_mod, generate_temperature_score_mod)

    score_mods = [generate_alibi_score_mod(num_heads=4), generate_relative_position_bias_score_mod(torch.randn(4, 33)),
                  generate_temperature_score_mod(torch.tensor([0.5, 1.0, 2.0, 1.5])),
                  generate_t5_relative_bias_score_mod(torch.randn(4, 8), max_distance=16)]
    document = get_mask_fn("document", offsets=[0, 5, 16])

    def attention_terms(score, h, q, kv):
        return [mod(score, 0, h, q, kv) for mod in score_mods] + [document(0, h, q, kv)]

    d = "meta"   # any device other than the tables' (a CUDA user's, here without a GPU)
    args = (torch.zeros(4, 16, 16, device=d), torch.arange(4, device=d).view(4, 1, 1),
            torch.arange(16, device=d).view(1, 16, 1), torch.arange(16, device=d).view(1, 1, 16))
    explained = torch._dynamo.explain(attention_terms)(*args)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert all(t.device.type == "meta" for t in attention_terms(*args))
