"""The benchmark's own measuring tools (pair counts, sampled reference, case masks) on CPU."""
import pytest
import torch

from dense_reference import dense_attention, rel_err
from flex_flash_infer import create_block_mask, create_mask
from flex_flash_infer_bench.masks import case_masks, count_visible_pairs, document_offsets, reference_rows


def test_visible_pairs_counts_exactly():
    for name, (mod, _, _) in case_masks(1000).items():
        H = 4 if name == "per_head_windows" else None   # per head: the mean over the heads
        bm = create_block_mask(mod, None, H, 1000, 1000, device="cpu")
        assert count_visible_pairs(bm) == create_mask(mod, 1, H, 1000, 1000, device="cpu").sum().item() / (H or 1), name


@pytest.mark.parametrize("name,S,H,rows", [("streaming", 300, 4, [0, 5, 150, 299]),
                                            ("per_head_windows", 1100, 8, [0, 300, 700, 1099])])
def test_reference_rows_match_dense_attention(rng, name, S, H, rows):
    """per_head_windows: each query head its own mask."""
    Hkv, D = 2, 16
    q = torch.randn(S, H, D, generator=rng)
    k = torch.randn(S, Hkv, D, generator=rng)
    v = torch.randn(S, Hkv, D, generator=rng)
    mod = case_masks(S)[name][0]
    rows = torch.tensor(rows)
    dense = create_mask(mod, 1, H, S, S, device="cpu")
    ref, _ = dense_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], dense)
    assert rel_err(reference_rows(q, k, v, mod, rows), ref[0].transpose(0, 1)[rows]) < 1e-5


def test_document_offsets_cover_the_sequence_with_bounded_lengths():
    offsets = document_offsets(32768)
    lengths = torch.tensor(offsets[1:]) - torch.tensor(offsets[:-1])
    assert offsets[0] == 0 and offsets[-1] == 32768
    assert bool((lengths[:-1] >= 256).all() and (lengths <= 4096).all())


def test_reference_rows_apply_the_score_mod_like_dense_attention(rng):
    from flex_flash_infer_bench.masks import case_masks, score_mod_cases

    S, H, Hkv, D = 200, 32, 8, 16
    q = torch.randn(S, H, D, generator=rng)
    k = torch.randn(S, Hkv, D, generator=rng)
    v = torch.randn(S, Hkv, D, generator=rng)
    rows = torch.tensor([0, 7, 199])
    for name, (mask_name, score_mod, _) in score_mod_cases().items():
        mod = case_masks(S)[mask_name][0]
        dense = create_mask(mod, 1, 1, S, S, device="cpu")
        ref, _ = dense_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], dense,
                                 score_fn=lambda s, b, h, qi, ki: score_mod(s.float(), b, h, qi, ki).double())
        got = reference_rows(q, k, v, mod, rows, score_mod)
        assert rel_err(got, ref[0].transpose(0, 1)[rows]) < 1e-5, name
        if name != "identity+causal":
            assert rel_err(got, reference_rows(q, k, v, mod, rows)) > 1e-3, name  # the mod changes the result


def test_the_fa4_forms_of_a_score_mod_give_the_same_scores(rng):
    from flex_flash_infer_bench.masks import fa4_score_mods, score_mod_cases

    forms = fa4_score_mods()
    assert forms   # the relative-position row has one
    h = torch.arange(32).view(-1, 1, 1)
    q_idx = torch.randint(0, 4096, (1, 64, 1), generator=rng)
    kv_idx = torch.randint(0, 4096, (1, 1, 64), generator=rng)
    kv_idx[..., :8] = q_idx[:, :8, 0].view(1, 1, 8)   # distances 0 and within the table's reach too
    score = torch.randn(32, 64, 64, generator=rng)
    for name, fa4_form in forms.items():
        library_form = score_mod_cases()[name][1]
        assert torch.equal(fa4_form(score, 0, h, q_idx, kv_idx), library_form(score, 0, h, q_idx, kv_idx)), name
        assert not torch.equal(fa4_form(score, 0, h, q_idx, kv_idx), score), name


def test_an_impl_that_failed_to_plan_reports_its_error_when_timed(monkeypatch):
    from flex_flash_infer_bench.masks import check_and_time, raising

    monkeypatch.setattr(torch.cuda, "Event", _Clock().Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    failed, ok = {}, {}
    check_and_time([(failed, raising(ValueError("no such kernel"))), (ok, lambda: torch.zeros(2))],
                   lambda out: 0.0)
    assert failed["error"] == "ValueError: no such kernel" and "ms" not in failed
    assert ok["rel_err"] == 0.0 and "error" not in ok and "ms" in ok


def test_a_failing_case_is_reported_and_the_run_goes_on(capsys):
    from flex_flash_infer_bench.masks import case_or_report

    failed = []

    def broken(name):
        raise RuntimeError(f"ninja: build stopped for {name}")

    assert case_or_report(failed, "streaming 8192", broken, "streaming") == []
    assert case_or_report(failed, "causal 8192", lambda: [{"impl": "flex_flash_infer"}]) == [{"impl": "flex_flash_infer"}]
    assert failed == ["streaming 8192: RuntimeError: ninja: build stopped for streaming"]
    assert "FAILED streaming 8192" in capsys.readouterr().out


def test_results_file_keeps_the_spec_rows_apart_and_merges_runs(tmp_path):
    """rows: the four implementations of the speed issue; other_rows: alternatives timed beside
    them. A new run replaces rows of the same case and impl, keeps the others and any note."""
    import json

    from flex_flash_infer_bench.masks import _save

    def row(impl, case="causal", ms=1.0):
        return {"case": case, "seq_len": 8192, "head_dim": 128, "impl": impl, "ms": ms}

    path = tmp_path / "dev.json"
    first = [row("flex_flash_infer"), row("torch_flex"), row("ours_tiles_route"), row("flex_flash_infer", "full")]
    _save(path, "GPU", "0.7", [], first, {"runs": "a note"})
    saved = json.loads(path.read_text())
    earlier = saved["rows"] + saved["other_rows"]
    _save(path, "GPU", "0.7", earlier, [row("flex_flash_infer", ms=0.5), row("ours_fa3_mask")],
          {"runs": saved["runs"]})
    result = json.loads(path.read_text())
    assert result["runs"] == "a note" and "switches" not in result
    assert {r["impl"] for r in result["rows"]} <= {"flex_flash_infer", "torch_flex", "flashinfer_native", "sdpa_cudnn"}
    assert sorted(r["impl"] for r in result["other_rows"]) == ["ours_fa3_mask", "ours_tiles_route"]
    ours = {r["case"]: r["ms"] for r in result["rows"] if r["impl"] == "flex_flash_infer"}
    assert ours == {"causal": 0.5, "full": 1.0}


class _Clock:
    """A stand-in GPU clock: each fn advances it by its cost; events read it."""
    def __init__(self):
        self.now = 0.0
        clock = self

        class Event:
            def __init__(self, enable_timing=False):
                self.t = None

            def record(self):
                self.t = clock.now

            def synchronize(self):
                pass

            def elapsed_time(self, end):
                return end.t - self.t

        self.Event = Event


def test_interleaved_timing_spreads_a_drift_over_every_impl(monkeypatch):
    """Two equal impls on a clock that slows as the case goes on: timed one after the other, the
    second reads slower; timed in rotating rounds, they read alike. An impl that raises is
    dropped with its error and the others are still timed."""
    from flex_flash_infer_bench import masks

    clock = _Clock()
    monkeypatch.setattr(torch.cuda, "Event", clock.Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    calls = []

    def equal_work():
        calls.append(1)
        clock.now += 1.0 + 0.002 * len(calls)   # each call a little slower than the last

    def broken():
        raise RuntimeError("launch failed")

    sequential = [masks.time_interleaved({name: equal_work})[0][name] for name in ("a", "b")]   # one after the other
    assert sequential[1] - sequential[0] > 0.1
    times, errors = masks.time_interleaved({"a": equal_work, "b": equal_work, "c": broken})
    assert set(times) == {"a", "b"} and errors == {"c": "RuntimeError: launch failed"}
    assert abs(times["a"] - times["b"]) < 0.25 * (sequential[1] - sequential[0])
    assert masks.time_interleaved({}) == ({}, {})
