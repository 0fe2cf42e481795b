"""Ragged launches of bands (plain and with a compiled score_mod): each (batch entry, band) pair is one request
whose first query and key positions and batch entry the kernel reads (CPU check of the layout)."""
import torch

from flex_flash_infer.planning.bands import Band, band_launches


def test_documents_over_a_batch_are_one_ragged_launch():
    bands = [Band(0, 100, 0, 100, True), Band(100, 250, 100, 250, True)]
    (launch,) = band_launches(bands, batch=2, q_len=250, kv_len=250)
    assert launch.qo_indptr.tolist() == [0, 100, 250, 350, 500]
    assert launch.kv_indptr.tolist() == [0, 100, 250, 350, 500]
    assert launch.req_q0.tolist() == [0, 100, 0, 100]
    assert launch.req_kv0.tolist() == [0, 100, 0, 100]
    assert launch.req_b.tolist() == [0, 0, 1, 1]
    # request r covers queries qo_indptr[r]..: its first absolute position is req_q0[r]
    for r in range(4):
        assert int(launch.qo_indptr[r]) == int(launch.req_b[r]) * 250 + int(launch.req_q0[r])


def test_stacked_bands_with_different_flags_are_one_launch_per_band_and_entry():
    bands = [Band(0, 64, 0, 64), Band(64, 300, 0, 300, True)]  # prefix-LM
    launches = band_launches(bands, batch=2, q_len=300, kv_len=300)
    assert len(launches) == 4
    second = launches[3]  # batch 1, causal band
    assert second.q_rows == slice(364, 600) and second.kv_rows == slice(300, 600)
    assert second.qo_indptr.tolist() == [0, 236] and second.kv_indptr.tolist() == [0, 300]
    assert (second.req_q0.item(), second.req_kv0.item(), second.req_b.item()) == (64, 0, 1)
    assert second.causal and not launches[0].causal
    assert all(t.dtype == torch.int32 for t in (second.qo_indptr, second.req_b))
