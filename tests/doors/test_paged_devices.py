"""PagedFlexAttention on a simulated CUDA device (tests/simulated_cuda.py: CPU tensors marked as
on the GPU, an operator mixing them with host tensors raises as CUDA torch does), FlashInfer
replaced by its CPU model: a plan that keeps some tables on the host must hand every FlashInfer
call tables it can combine. A host qo_indptr beside a masked launch's device tables failed every
bit-mask launch on a GPU (documents, prefix-LM, attamba, streaming's sinks, tree masks) while
the CPU tests passed."""
import pytest
import torch

from flexfuzz.cpu_model import patched
from flex_flash_infer import PagedFlexAttention, get_mask_fn
from simulated_cuda import simulated_cuda


def documents(b, h, q, kv):
    return ((q // 37) == (kv // 37)) & (q >= kv)


def bias(score, b, h, q, kv):
    return score + 0.01 * (q - kv)


MASKS = [("causal", get_mask_fn("causal")), ("window", get_mask_fn("sliding_window", window_size=40)),
         ("streaming", get_mask_fn("streaming", sink_size=3, window_size=33)),
         ("attamba", get_mask_fn("attamba", window_size=24, chunk_size=16)),
         ("prefix_lm", get_mask_fn("prefix_lm", prefix_len=50)), ("documents", documents)]


@pytest.mark.parametrize("name,mask", MASKS, ids=[m[0] for m in MASKS])
@pytest.mark.parametrize("qo_lens", [[1, 1, 1, 0], [5, 40, 7, 0]], ids=["decode", "prefill"])
@pytest.mark.parametrize("tables_on", ["cuda", "cpu"])
@pytest.mark.parametrize("score_mod", [None, bias], ids=["plain", "score_mod"])
def test_paged_plans_hand_flashinfer_tables_on_one_device(monkeypatch, name, mask, qo_lens, tables_on, score_mod):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    kv_lens, page, hq, hkv, d = [17, 300, 100, 0], 16, 4, 2, 16
    pages = [-(-n // page) for n in kv_lens]
    gen = torch.Generator().manual_seed(0)
    with simulated_cuda():
        def table(values):
            return torch.tensor(values, dtype=torch.int64 if tables_on == "cuda" else torch.int32, device=tables_on)

        indptr = table(torch.tensor([0] + pages).cumsum(0).tolist())
        indices = table(torch.randperm(sum(pages) + 2, generator=gen)[:sum(pages)].tolist())
        last = table([n - (p - 1) * page if p else 0 for n, p in zip(kv_lens, pages)])
        qo = table(torch.tensor([0] + qo_lens).cumsum(0).tolist())
        k, v = (torch.randn(sum(pages) + 2, page, hkv, d, generator=gen).to("cuda") for _ in range(2))
        q = torch.randn(sum(qo_lens), hq, d, generator=gen).to("cuda")
        with patched({}, cpu_model=True):
            results = {}
            for backend in ("flashinfer", "reference"):
                attention = PagedFlexAttention(device="cuda", backend=backend)
                attention.plan(mask, qo, indptr, indices, last, hq, hkv, d, page, dtype=torch.float32,
                               score_mod=score_mod)
                results[backend] = attention.run(q, (k, v), return_lse=True)
        (out, lse), (ref_out, ref_lse) = results["flashinfer"], results["reference"]
        assert out.device.type == "cuda"
        assert (out.cpu() - ref_out.cpu()).abs().max().item() < 1e-4
        seen = torch.isfinite(ref_lse.cpu())
        assert torch.equal(torch.isfinite(lse.cpu()), seen)
