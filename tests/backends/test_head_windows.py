"""Per-head causal windows in one launch (backends/head_windows.py) and the patched header copies
it compiles against (compile/patched_headers.py), on CPU: the patches on a stand-in include tree,
which per-head plans qualify and their window table, and the launch's wiring with the kernel
replaced by a float64 model of what the patched kernel computes (each query head its own window,
base-2 LSE)."""
import math
import sys

import pytest
import torch

import fake_flashinfer
from dense_reference import dense_attention, rel_err
from flex_flash_infer import create_block_mask
from flex_flash_infer.backends import flashinfer_backend, head_windows
from flex_flash_infer.compile import lean_modules, patched_headers
from flex_flash_infer.planning.plan import plan_attention
from flexfuzz.routes import plan_route


def _tree(tmp_path, texts):
    for rel, text in texts.items():
        path = tmp_path / "src" / "flashinfer" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path / "src"


def _fitting_texts():
    """The texts every head_windows patch expects, as often as it expects them."""
    texts = {}
    for rel, old, _, times in patched_headers.PATCH_SETS["head_windows"]:
        texts[rel] = texts.get(rel, "// header\n") + (old + "\n") * times
    return texts


def test_patches_apply_once_to_a_copy_and_refuse_another_version(tmp_path):
    source = _tree(tmp_path, _fitting_texts())
    root = patched_headers.patched_tree("head_windows", source, tmp_path / "cache")
    assert root is not None and root != source
    for rel, old, new, times in patched_headers.PATCH_SETS["head_windows"]:
        text = (root / "flashinfer" / rel).read_text()
        assert text.count(new) >= times
    assert "FFI_WINDOW_LEFT(mainloop_params, qo_head_idx)" in (root / "flashinfer/attention/hopper/prefill_sm90.cuh").read_text()
    # the installed headers are never touched, and a second ask reuses the copy
    assert "FFI_WINDOW_LEFT" not in (source / "flashinfer/attention/hopper/utils.cuh").read_text()
    assert patched_headers.patched_tree("head_windows", source, tmp_path / "cache") == root
    # a text found a different number of times (another FlashInfer): no copy, and the refusal is kept
    other = _fitting_texts()
    other["attention/hopper/prefill_sm90.cuh"] = "mainloop_params.window_left\n"   # once, not twice
    assert patched_headers.patched_tree("head_windows", _tree(tmp_path / "b", other), tmp_path / "cache2") is None
    assert list((tmp_path / "cache2").glob("*.refused"))
    assert not [p for p in (tmp_path / "cache2").iterdir() if p.is_dir()]   # no half-made tree left


def test_a_module_asking_for_patched_headers_gets_them_first_on_its_path(tmp_path, monkeypatch):
    class Spec:   # FlashInfer's JitSpec is a dataclass; this stands in with the one field used
        pass

    import dataclasses

    Spec = dataclasses.make_dataclass("Spec", [("name", str), ("extra_include_dirs", list)])
    monkeypatch.setattr(patched_headers, "include_root", lambda name: tmp_path / name)
    args = head_windows.jit_args(torch.bfloat16, 128)
    spec = lean_modules.with_patched_headers(Spec("m", ["/other"]), args[1:])
    assert spec.extra_include_dirs == [tmp_path / "head_windows", "/other"]
    plain = lean_modules.with_patched_headers(Spec("m", []), ["#include<flashinfer/attention/hopper/variants.cuh>"])
    assert plain.extra_include_dirs == []
    monkeypatch.setattr(patched_headers, "include_root", lambda name: None)
    with pytest.raises(RuntimeError, match="head_windows"):
        lean_modules.with_patched_headers(Spec("m", []), args[1:])


def _plan(mod, H, L, S):
    bm = create_block_mask(mod, None, H, L, S, device="cpu", BLOCK_SIZE=64)
    return plan_attention(bm, 1, L, S, H, 2, 16, torch.device("cpu"), None, False, None, 1.0)


def test_which_per_head_plans_run_as_one_launch():
    widths = torch.tensor([64, 129, 0, 300])   # 0: plain causal

    def windows(b, h, q, kv):
        w = widths[h % 4]
        return (kv <= q) & ((q - kv < w) | (w == 0))

    plan = _plan(windows, 8, 500, 500)
    assert plan.route == "bands-per-head"
    assert head_windows.head_window_table(plan.head_bands, 8, 500, 500) == [63, 128, 500, 299] * 2
    prefixes = torch.tensor([64, 129, 0, 300])

    def per_head_prefixes(b, h, q, kv):   # a full block then a causal band: more than a window
        return (kv <= q) | (kv < prefixes[h % 4])

    plan = _plan(per_head_prefixes, 8, 500, 500)
    assert plan.route == "bands-per-head" and head_windows.head_window_table(plan.head_bands, 8, 500, 500) is None


def _model_kernel(calls):
    """planned_ragged's stand-in: records each launch and computes what the patched kernel does."""
    class Wrapper:
        def __init__(self, qo_indptr, kv_indptr, causal, window_left, jit_args):
            self.qo, self.kv, self.causal, self.jit_args = qo_indptr, kv_indptr, causal, jit_args
            calls.append(self)

        def run(self, q, k, v, *args, return_lse=False):
            names = self.jit_args[7]
            tensors, scalars = args[:len(names)], args[len(names):]
            table = tensors[names.index(head_windows.TABLE)]
            assert names[0] == head_windows.TABLE and tensors[1:] == (None, None, None, None)
            assert table.dtype == torch.int32 and table.is_contiguous()
            assert self.jit_args[9][1] == "sm_scale"
            scale = scalars[1]
            group = q.shape[1] // k.shape[1]
            out = torch.zeros(q.shape, dtype=torch.float64)
            lse = torch.full(q.shape[:2], -math.inf, dtype=torch.float64)
            for r in range(self.qo.numel() - 1):
                q0, q1, k0, k1 = (int(x) for x in (self.qo[r], self.qo[r + 1], self.kv[r], self.kv[r + 1]))
                s = torch.einsum("nhd,khd->hnk", q[q0:q1].double(), k[k0:k1].double().repeat_interleave(group, 1))
                pos = torch.arange(q1 - q0).view(1, -1, 1) + (k1 - k0) - (q1 - q0)
                kv = torch.arange(k1 - k0).view(1, 1, -1)
                keep = (kv <= pos) & (kv >= pos - table.long().view(-1, 1, 1))
                s = (s * scale).masked_fill(~keep, -math.inf)
                m = s.amax(-1, keepdim=True).clamp(min=-1e300)
                p = (s - m).exp()
                out[q0:q1] = torch.einsum("hnk,khd->nhd", p / p.sum(-1, keepdim=True),
                                          v[k0:k1].double().repeat_interleave(group, 1))
                lse[q0:q1] = ((m.squeeze(-1) + p.sum(-1).log()) / math.log(2)).t()   # base 2, as FlashInfer
            out = out.to(q.dtype)
            return (out, lse.float()) if return_lse else out

    def planned(workspace, backend, qo_indptr, kv_indptr, shape, dtype, causal, window_left, jit_args=None, **_):
        assert backend == "fa3" and causal and jit_args is not None
        return Wrapper(qo_indptr, kv_indptr, causal, window_left, jit_args)

    return planned


@pytest.mark.parametrize("B,Hq,Hkv,L", [(1, 8, 2, 300), (2, 6, 3, 200)])
def test_one_launch_for_every_head_matches_the_reference(monkeypatch, rng, B, Hq, Hkv, L):
    monkeypatch.setitem(sys.modules, "flashinfer", fake_flashinfer.module())
    monkeypatch.setattr(flashinfer_backend, "_is_hopper", lambda device: True)
    monkeypatch.setattr(head_windows, "available", lambda device, dtype, head_dim: True)
    calls = []
    monkeypatch.setattr(head_windows, "planned_ragged", _model_kernel(calls))
    widths = torch.tensor([1, 40, 0, 130, 77, 299])

    def windows(b, h, q, kv):
        w = widths[h % 6]
        return (kv <= q) & ((q - kv < w) | (w == 0))

    D = 16
    bm = create_block_mask(windows, None, Hq, L, L, device="cpu", BLOCK_SIZE=64)   # broadcast over the batch
    plan = flashinfer_backend.FlashInferPlan(bm, B, L, L, Hq, Hkv, D, torch.float64, D ** -0.5, "cpu")
    assert plan.head_windows is not None and plan.head_band_runs is None and len(calls) == 1
    assert plan_route(plan) == "bands-per-head/one-launch"   # the fuzzer counts this route apart
    q = torch.randn(B, Hq, L, D, generator=rng, dtype=torch.float64)
    k = torch.randn(B, Hkv, L, D, generator=rng, dtype=torch.float64)
    v = torch.randn(B, Hkv, L, D, generator=rng, dtype=torch.float64)
    out, lse = plan.run(q.transpose(1, 2).reshape(B * L, Hq, D), k.transpose(1, 2), v.transpose(1, 2))
    qi, ki = torch.arange(L).view(-1, 1), torch.arange(L).view(1, -1)
    dense = torch.stack([(ki <= qi) & ((qi - ki < int(widths[h % 6])) | (int(widths[h % 6]) == 0))
                         for h in range(Hq)])[None]
    ref_out, ref_lse = dense_attention(q, k, v, dense)
    assert rel_err(out.view(B, L, Hq, D).transpose(1, 2), ref_out) < 1e-6
    assert torch.allclose(lse.view(B, L, Hq).transpose(1, 2).double(), ref_lse, atol=1e-4)   # natural log
    alone, none = plan.run(q.transpose(1, 2).reshape(B * L, Hq, D), k.transpose(1, 2), v.transpose(1, 2),
                           return_lse=False)
    assert none is None and torch.equal(alone, out)
