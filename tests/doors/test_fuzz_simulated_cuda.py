"""The differential fuzzer's cases on a simulated CUDA device (tests/flexfuzz/simulated.py over
tests/simulated_cuda.py): every door (flex, decode, seed, varlen, paged) with its tensors marked as
on the GPU, FlashInfer's CPU model checking what the real wrappers do with the tables they get
(plan() computes with qo_indptr and a launch's tables before moving them; the kernels read every
tensor on the workspace's device and the tables as the module's IdType), and every operator that
mixes device tensors with host tensors raising as CUDA torch does. A host tensor meeting device
tensors in the library's own code, or in a table it hands FlashInfer, fails here without a GPU
(a host qo_indptr beside a masked paged launch's device tables once shipped, seen only on a GPU).
Longer campaigns: python scripts/fuzz.py --simulated --minutes 30."""
import os
import random

import pytest
import torch

from flexfuzz import campaign

FIXED_SEED = 20
# about 0.3 s a case on an idle core: 40 at the fixed seed (its first cases walk all five doors), 20 fresh
CASES = int(os.environ.get("FLEX_FUZZ_SIMULATED_CASES", "40"))
DOORS = {"flex", "decode", "seed", "varlen", "paged"}


def _report(summary, seed) -> str:
    return (f"simulated fuzz seed {seed}: python scripts/fuzz.py --simulated --seed {seed} --cases {CASES} "
            f"reruns it, python scripts/fuzz.py --simulated --case SEED:INDEX one case\n" + summary.report())


def test_a_fixed_seed_on_a_simulated_gpu_finds_no_host_device_mix():
    summary = campaign.run(seed=FIXED_SEED, cases=CASES, per_seed=CASES, simulated=True)
    report = _report(summary, FIXED_SEED)
    print(report)
    assert not summary.invalid and not summary.generator_errors, report
    assert not summary.failures, report
    doors = {key.split(" ", 1)[0] for key in summary.routes}
    assert DOORS <= doors, f"doors no case reached: {DOORS - doors}\n{report}"
    assert not torch.cuda.is_available()   # the simulation is undone


def test_a_fresh_seed_on_a_simulated_gpu_finds_no_host_device_mix():
    seed = random.SystemRandom().randrange(1 << 31)
    summary = campaign.run(seed=seed, cases=CASES // 2, per_seed=CASES, simulated=True)
    report = _report(summary, seed)
    print(report)
    assert not summary.invalid and not summary.generator_errors, report
    assert not summary.failures, report


# ------------------------------------------------------------- the simulation's own checks
def test_the_simulation_raises_on_a_host_device_mix_and_builds_torch_masks_on_the_device():
    from flexfuzz.simulated import simulated

    with simulated():
        from torch.nn.attention.flex_attention import create_block_mask   # as the doors import it, per call

        device_table = torch.arange(4, device="cuda")
        with pytest.raises(RuntimeError, match="same device"):
            device_table + torch.arange(4)
        assert (device_table + torch.tensor(1)).is_cuda   # a 0-d host tensor mixes, as on CUDA
        # torch's own builder (vmap inside) gives its tables on the device asked for
        mask = create_block_mask(lambda b, h, q, kv: q >= kv, 1, 1, 64, 64, device="cuda", BLOCK_SIZE=16)
        assert mask.kv_num_blocks.is_cuda and mask.kv_indices.is_cuda


def test_the_cpu_model_computes_a_bit_masks_offsets_on_the_tables_as_given():
    """FlashInfer 0.7.2's paged plan(): _compute_page_mask_indptr(qo_indptr, kv_indptr,
    last_page_len) before any table is moved, so a host qo_indptr beside device tables raises on a
    GPU; tables all on the host are moved one by one and pass."""
    import fake_flashinfer

    from flexfuzz.simulated import simulated

    with simulated():
        def tables(device):
            return [torch.tensor(x, dtype=torch.int32, device=device) for x in ([0, 2], [0, 1], [0], [3])]

        workspace = torch.empty(8, dtype=torch.uint8, device="cuda")
        mask = torch.ones(6, dtype=torch.bool, device="cuda")
        wrapper = fake_flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, backend="fa2")
        wrapper.plan(*tables("cpu"), 4, 4, 16, 16, custom_mask=mask)
        wrapper.plan(*tables("cuda"), 4, 4, 16, 16, custom_mask=mask)
        qo, *rest = tables("cuda")
        with pytest.raises(RuntimeError, match="same device"):
            wrapper.plan(qo.cpu(), *rest, 4, 4, 16, 16, custom_mask=mask)
        with pytest.raises(AssertionError, match="FlashInfer kernel"):   # segment_packbits is a CUDA kernel
            wrapper.plan(*tables("cuda"), 4, 4, 16, 16, custom_mask=mask.cpu())
        with pytest.raises(AssertionError, match="the module reads it as"):   # the C++ reads every table as kv_indptr's dtype
            wrapper.plan(qo.long(), *rest, 4, 4, 16, 16)


def test_the_cpu_model_checks_merge_states_inputs_as_cascade_cu():
    import fake_flashinfer

    v = torch.randn(4, 2, 8)
    s = torch.randn(4, 2)
    fake_flashinfer.merge_state(v, s, v, s)
    with pytest.raises(AssertionError, match="contiguous"):
        strided = torch.randn(2, 4, 8).transpose(0, 1)
        fake_flashinfer.merge_state_in_place(strided, s, v, s)
    with pytest.raises(AssertionError, match="lost"):   # s.to(float32) is a copy: the caller's LSE stays
        fake_flashinfer.merge_state_in_place(v.clone(), s.double(), v, s)
