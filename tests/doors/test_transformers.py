"""A Llama-style transformers model (random weights, built from a config) with its attention
running through flex-flash-infer: logits match the SDPA implementation."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from flex_flash_infer import get_mask_fn  # noqa: E402
from flex_flash_infer.integrations.transformers import attention_mods, register  # noqa: E402


def tiny_llama(attn_implementation, seed=0):
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM._from_config(config, attn_implementation=attn_implementation).eval()


@pytest.fixture(scope="module")
def models():
    register()
    ours, sdpa = tiny_llama("flex_infer"), tiny_llama("sdpa")
    ours.load_state_dict(sdpa.state_dict())
    return ours, sdpa


def test_logits_match_sdpa(models, rng):
    ours, sdpa = models
    ids = torch.randint(0, 256, (2, 77), generator=rng)
    with torch.no_grad():
        a, b = ours(ids).logits, sdpa(ids).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()


def test_padding_mask_matches_sdpa(models, rng):
    ours, sdpa = models
    ids = torch.randint(0, 256, (2, 40), generator=rng)
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :7] = 0                                       # left padding in the second sequence
    with torch.no_grad():
        a, b = ours(ids, attention_mask=mask).logits, sdpa(ids, attention_mask=mask).logits
    assert torch.allclose(a[0], b[0], atol=1e-4, rtol=1e-4)
    assert torch.allclose(a[1, 7:], b[1, 7:], atol=1e-4, rtol=1e-4)


def test_greedy_generation_with_kv_cache_matches_sdpa(models, rng):
    ours, sdpa = models
    ids = torch.randint(0, 256, (1, 20), generator=rng)
    with torch.no_grad():
        # min_new_tokens: twelve steps whatever the random prompt (an end-of-sequence token stopped
        # both generations early for some seeds)
        a = ours.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)
        b = sdpa.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)
    assert torch.equal(a.sequences, b.sequences)
    # every decode step's logits, not only their argmax (a step that hid a cached key could keep it)
    assert len(a.logits) == len(b.logits) == 12
    for step, (x, y) in enumerate(zip(a.logits, b.logits)):
        assert torch.allclose(x, y, atol=1e-4, rtol=1e-4), (step, (x - y).abs().max())


def test_a_mask_mod_changes_the_pattern_exactly(models, rng):
    ours, _ = models
    ids = torch.randint(0, 256, (1, 64), generator=rng)
    window = get_mask_fn("sliding_window", window_size=8)
    with torch.no_grad(), attention_mods(mask_mod=window):
        windowed = ours(ids).logits
    # SDPA given the window as a dense 4-D mask, written out here
    q, kv = torch.arange(64).view(-1, 1), torch.arange(64).view(1, -1)
    dense = torch.zeros(1, 1, 64, 64).masked_fill(~((q >= kv) & (q - kv < 8)), torch.finfo(torch.float32).min)
    _, sdpa = models
    with torch.no_grad():
        want = sdpa(ids, attention_mask=dense).logits
        full = ours(ids).logits
    assert torch.allclose(windowed, want, atol=1e-4, rtol=1e-4), (windowed - want).abs().max()
    assert not torch.allclose(windowed[:, 20:], full[:, 20:], atol=1e-3)   # the window made a difference
    # changing a token outside every later window leaves the last position unchanged
    ids2 = ids.clone()
    ids2[0, 0] = (ids[0, 0] + 1) % 256
    with torch.no_grad(), attention_mods(mask_mod=window):
        moved = ours(ids2).logits
    assert torch.allclose(moved[:, -1], windowed[:, -1], atol=1e-5)


@pytest.mark.parametrize("reads", ["b", "h"])
def test_a_mask_mod_that_reads_the_sample_or_head_holds_for_each(rng, reads):
    """A per-sample document mask (b) or per-head windows (h) given to attention_mods: each sample
    and head gets its own mask, as SDPA with the dense mask gives (tables of sample 0 or head 0
    alone would be broadcast to the others)."""
    from flex_flash_infer.integrations.transformers import attention_forward

    B, H, L, D = 2, 4, 300, 16
    lengths = torch.tensor([[300, 0, 0], [100, 120, 80]])
    doc_ids = torch.stack([torch.repeat_interleave(torch.arange(3), n) for n in lengths])
    windows = torch.tensor([5, 30, 70, 260])

    def document_causal(b, h, q, kv):
        return (doc_ids[b, q] == doc_ids[b, kv]) & (q >= kv)

    def per_head_window(b, h, q, kv):
        return (q >= kv) & (q - kv < windows[h])

    mask_mod = document_causal if reads == "b" else per_head_window
    q, k, v = (torch.randn(B, H, L, D, generator=rng, dtype=torch.float64) for _ in range(3))
    module = torch.nn.Module()
    with torch.no_grad(), attention_mods(mask_mod=mask_mod):
        got, _ = attention_forward(module, q, k, v, None)
    grid = (torch.arange(B).view(-1, 1, 1, 1), torch.arange(H).view(1, -1, 1, 1), torch.arange(L).view(1, 1, -1, 1),
            torch.arange(L).view(1, 1, 1, -1))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask_mod(*grid)).transpose(1, 2)
    assert (got - want).abs().max() < 1e-10


def tiny_gemma2(attn_implementation, softcap, seed=0):
    """Gemma 2: sliding-window layers and a logit soft cap (small enough to matter for random weights)."""
    config = transformers.Gemma2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       max_position_embeddings=512, sliding_window=8, attn_logit_softcapping=softcap,
                                       final_logit_softcapping=None, query_pre_attn_scalar=16)
    torch.manual_seed(seed)
    return transformers.Gemma2ForCausalLM._from_config(config, attn_implementation=attn_implementation).eval()


def test_a_models_own_softcap_and_sliding_layers_match_eager(rng):
    """Gemma 2 hands its soft cap to the attention as a keyword: it runs (as a score_mod) and the
    logits and the greedy tokens match transformers' eager attention; without the cap they differ."""
    register()
    ours, eager = tiny_gemma2("flex_infer", 0.02), tiny_gemma2("eager", 0.02)
    ours.load_state_dict(eager.state_dict())
    uncapped = tiny_gemma2("eager", None)
    uncapped.load_state_dict(eager.state_dict())
    ids = torch.randint(0, 256, (2, 40), generator=rng)
    with torch.no_grad():
        a, b, c = ours(ids).logits, eager(ids).logits, uncapped(ids).logits
        tokens = ours.generate(ids[:1, :20], max_new_tokens=10, do_sample=False)
        expected = eager.generate(ids[:1, :20], max_new_tokens=10, do_sample=False)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
    assert not torch.allclose(b, c, atol=1e-3)        # the cap changes the result at this size
    assert torch.equal(tokens, expected)


def test_learned_attention_sinks_raise_instead_of_being_dropped():
    from flex_flash_infer.integrations.transformers import attention_forward

    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(NotImplementedError, match="s_aux"):
        attention_forward(torch.nn.Module(), q, q, q, None, s_aux=torch.zeros(2))


@pytest.mark.gpu
@pytest.mark.parametrize("mask_name", [None, "sliding_window"])
def test_gpu_bf16_logits_match_sdpa_through_flashinfer(monkeypatch, mask_name):
    """head_dim 128 in bf16 on CUDA: the FlashInfer backend runs every layer (the reference is
    patched to fail), and the logits match SDPA's with the same dense mask within bf16 tolerance."""
    from flex_flash_infer import api

    def no_reference(*args, **kwargs):
        raise AssertionError("the reference backend ran; expected FlashInfer")

    monkeypatch.setattr(api, "reference_attention", no_reference)
    register()
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    torch.manual_seed(0)
    sdpa = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval().cuda().bfloat16()
    ours = transformers.LlamaForCausalLM._from_config(config, attn_implementation="flex_infer").eval().cuda().bfloat16()
    ours.load_state_dict(sdpa.state_dict())
    ids = torch.randint(0, 512, (2, 333), device="cuda")
    mask_mod = get_mask_fn(mask_name, window_size=64) if mask_name else None
    with torch.no_grad(), attention_mods(mask_mod=mask_mod):
        a = ours(ids).logits.float()
    if mask_name:  # SDPA with the same pattern as a dense additive mask
        q, kv = torch.arange(333, device="cuda").view(-1, 1), torch.arange(333, device="cuda").view(1, -1)
        dense = (q >= kv) & (q - kv < 64)
        bias = torch.zeros(2, 1, 333, 333, device="cuda", dtype=torch.bfloat16).masked_fill(~dense, float("-inf"))
        with torch.no_grad():
            b = sdpa(ids, attention_mask=bias).logits.float()
    else:
        with torch.no_grad():
            b = sdpa(ids).logits.float()
    assert not torch.isnan(a).any()
    assert ((a - b).norm() / b.norm()).item() < 2e-2


@pytest.mark.gpu
def test_gpu_gemma2_softcap_and_sliding_layers_through_flashinfer(monkeypatch):
    """Gemma 2 in bf16 on CUDA: the soft cap runs as a compiled score_mod on FlashInfer (on the
    band route for global layers, the tiles route for the sliding layers' dense mask; the reference
    is patched to fail) and the logits match transformers' eager attention within bf16 tolerance."""
    from flex_flash_infer import api

    def no_reference(*args, **kwargs):
        raise AssertionError("the reference backend ran; expected FlashInfer")

    monkeypatch.setattr(api, "reference_attention", no_reference)
    register()
    config = transformers.Gemma2Config(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                                       max_position_embeddings=1024, sliding_window=64, attn_logit_softcapping=5.0,
                                       final_logit_softcapping=None, query_pre_attn_scalar=128)
    torch.manual_seed(0)
    eager = transformers.Gemma2ForCausalLM._from_config(config, attn_implementation="eager").eval().cuda().bfloat16()
    ours = transformers.Gemma2ForCausalLM._from_config(config, attn_implementation="flex_infer").eval().cuda().bfloat16()
    ours.load_state_dict(eager.state_dict())
    ids = torch.randint(0, 512, (2, 333), device="cuda")
    with torch.no_grad():
        a, b = ours(ids).logits.float(), eager(ids).logits.float()
    assert not torch.isnan(a).any()
    assert ((a - b).norm() / b.norm()).item() < 2e-2


# ---- the attention function itself, against torch's SDPA given the same mask -------------------

def _attend(query, key, value, attention_mask=None, **kwargs):
    from flex_flash_infer.integrations.transformers import attention_forward

    module = torch.nn.Module()
    module.is_causal = True
    out, _ = attention_forward(module, query, key, value, attention_mask, scaling=query.shape[-1] ** -0.5, **kwargs)
    return out.transpose(1, 2)


def _qkv(rng, q_len, kv_len, heads=2):
    return (torch.randn(1, heads, q_len, 16, generator=rng), torch.randn(1, heads, kv_len, 16, generator=rng),
            torch.randn(1, heads, kv_len, 16, generator=rng))


def test_no_mask_with_more_cache_slots_than_queries_is_causal_from_the_first_slot(rng):
    """An empty static cache's prefill: no mask, kv_len > q_len, as SDPA's is_causal (top left)."""
    q, k, v = _qkv(rng, 5, 32)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (_attend(q, k, v) - want).abs().max() < 1e-5


def test_a_float_mask_with_a_soft_bias_is_added_to_the_scores(rng):
    q, k, v = _qkv(rng, 6, 6)
    mask = torch.zeros(1, 1, 6, 6)
    mask[..., 2] = -2.0                                   # a soft bias on one key
    mask[..., 0, 1:] = torch.finfo(torch.float32).min     # and hidden keys
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert (_attend(q, k, v, mask) - want).abs().max() < 1e-5


def test_a_mask_buffer_written_in_place_between_calls_is_read_anew(rng):
    q, k, v = _qkv(rng, 256, 256)
    mask = torch.ones(1, 1, 256, 256, dtype=torch.bool).tril()
    _attend(q, k, v, mask)
    mask[..., 200:, 10] = False                           # inside a tile that was full
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert (_attend(q, k, v, mask) - want).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["position_bias", "sinks", "indices", "block_indices"])
def test_model_arguments_it_cannot_apply_raise(rng, name):
    q, k, v = _qkv(rng, 4, 4)
    with pytest.raises(NotImplementedError, match=name if name != "sinks" else "sinks"):
        _attend(q, k, v, **{name: torch.zeros(1)})


def test_the_calls_is_causal_comes_before_the_modules(rng):
    """transformers' SDPA takes a call's is_causal first (Llama 4's vision encoder passes
    is_causal=False, no mask, from a module without the attribute): full attention, not causal."""
    q, k, v = _qkv(rng, 6, 6)
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    causal = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (_attend(q, k, v, is_causal=False) - full).abs().max() < 1e-5
    assert (_attend(q, k, v, is_causal=True) - causal).abs().max() < 1e-5
    assert (_attend(q, k, v) - causal).abs().max() < 1e-5   # neither says: causal, as before


def test_a_learned_float_mask_at_zero_gets_its_gradient(rng):
    """A float mask that requires grad and is 0 wherever visible (a learned bias at its zero init):
    its term was left out as adding nothing, and the bias got no gradient."""
    q, k, v = _qkv(rng, 6, 6)
    bias = torch.zeros(1, 1, 6, 6, requires_grad=True)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    (ours,) = torch.autograd.grad(_attend(q, k, v, bias.masked_fill(~causal, torch.finfo(torch.float32).min))
                                  .square().sum(), bias, allow_unused=True)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias.masked_fill(
        ~causal, torch.finfo(torch.float32).min))
    (expected,) = torch.autograd.grad(want.transpose(1, 2).square().sum(), bias)
    assert ours is not None and (ours - expected).abs().max() < 1e-4


def test_packed_sequences_under_a_mask_mod_raise(rng):
    """Positions that restart inside a row (transformers' packed sequences): the model keeps each
    sequence apart, a mask_mod or score_mod on slots would not."""
    q, k, v = _qkv(rng, 6, 6)
    with attention_mods(mask_mod=get_mask_fn("causal")):
        with pytest.raises(NotImplementedError, match="packed"):
            _attend(q, k, v, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]]))
        _attend(q, k, v, position_ids=torch.arange(6)[None])   # counting up: fine


def test_a_mask_mod_with_positions_that_are_not_cache_slots_raises(rng):
    """A static cache (queries at positions 0..4 of 32 slots) or a padded batch: the mask_mod
    would see the wrong positions or the padding."""
    q, k, v = _qkv(rng, 5, 32)
    with attention_mods(mask_mod=get_mask_fn("causal")):
        with pytest.raises(NotImplementedError, match="cache slot"):
            _attend(q, k, v, position_ids=torch.arange(5)[None])
        padded = torch.ones(1, 1, 5, 5, dtype=torch.bool).tril()
        padded[..., 0] = False
        with pytest.raises(NotImplementedError, match="padded"):
            _attend(*_qkv(rng, 5, 5), padded)


def test_a_mask_per_head_is_read_per_head(rng):
    """A 4-D mask [B, Hq, Q, KV] whose heads differ: SDPA applies each head's (head 0's alone was used)."""
    q, k, v = _qkv(rng, 12, 12, heads=4)
    mask = torch.ones(1, 4, 12, 12, dtype=torch.bool).tril()
    mask[:, 1] &= (torch.arange(12)[:, None] - torch.arange(12)[None]) < 3   # head 1: a window of 3
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert (_attend(q, k, v, mask) - want).abs().max() < 1e-5
    soft = torch.zeros(1, 4, 12, 12).masked_fill(~mask, torch.finfo(torch.float32).min)
    soft[:, 2, :, 3] = -1.5                                                   # a soft bias on head 2 alone
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=soft)
    assert (_attend(q, k, v, soft) - want).abs().max() < 1e-5


def test_a_score_mod_alone_sees_the_query_position_while_decoding(models, rng):
    """One query per step with a DynamicCache (the model passes no mask): the score_mod saw q_idx 0
    (0.34 off a full pass for a thresholded distance bias)."""
    ours, _ = models

    def penalise_far_keys(score, b, h, q_idx, kv_idx):
        return score - 3.0 * ((q_idx - kv_idx) > 4)

    ids = torch.randint(0, 256, (1, 20), generator=rng)
    with torch.no_grad(), attention_mods(score_mod=penalise_far_keys):
        full = ours(ids).logits
        cache = transformers.DynamicCache(config=ours.config)
        steps = [ours(ids[:, :12], past_key_values=cache, use_cache=True).logits]
        steps += [ours(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(12, 20)]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-4


def test_a_score_mod_alone_with_positions_that_are_not_cache_slots_raises(rng):
    """As a mask_mod does: a padded batch or a sliding/static cache would give it the wrong positions."""
    def distance_bias(score, b, h, q_idx, kv_idx):
        return score - 0.1 * (q_idx - kv_idx)

    with attention_mods(score_mod=distance_bias):
        with pytest.raises(NotImplementedError, match="score_mod.*cache slot"):
            _attend(*_qkv(rng, 1, 8), position_ids=torch.tensor([[12]]))
        padded = torch.ones(1, 1, 5, 5, dtype=torch.bool).tril()
        padded[..., 0] = False
        with pytest.raises(NotImplementedError, match="score_mod.*padded"):
            _attend(*_qkv(rng, 5, 5), padded)
