"""Key tiles FlashInfer's Hopper (fa3) kernel computes for a causal sliding window, read from
FlashInfer 0.7.2's include/flashinfer/attention/hopper/utils.cuh: get_swa_begin_kv_tile_idx is
(q_tile * CTA_Q + kv_len - qo_len - window_left) / CTA_KV - 1, and the mainloops visit tiles
from the last down to that one inclusive, so each query tile computes one key tile before the
first key its first row sees: every key in it is masked. This counts the tiles with and without
that extra one (issue 22's lead; a kernel variant without it is not built).

    python scripts/fa3_window_tiles.py
"""


def tiles(seq_len: int, window: int, cta_q: int, cta_kv: int, extra: bool) -> int:
    total = 0
    for t in range(-(-seq_len // cta_q)):
        q0, q1 = t * cta_q, min(seq_len, (t + 1) * cta_q)
        last = -(-q1 // cta_kv)                      # causal: up to the last row's own key
        first = max((q0 - (window - 1)) // cta_kv - (1 if extra else 0), 0)
        total += last - first
    return total


if __name__ == "__main__":
    for seq_len in (8192, 32768):
        for window in (128, 256, 512, 1024):
            for head_dim, cta_q, cta_kv in ((128, 128, 128), (64, 192, 128)):   # fa3's tiles for these head_dims
                a, b = (tiles(seq_len, window, cta_q, cta_kv, extra) for extra in (True, False))
                print(f"{seq_len:6d} tokens, window {window:5d}, d{head_dim}: {a:5d} key tiles, {b:5d} without "
                      f"the masked one ({100 * (a - b) / a:.1f}% fewer)")
