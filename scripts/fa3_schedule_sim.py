"""FlashInfer 0.7.2's Hopper ragged-prefill scheduler (PrefillSM90Plan in
include/flashinfer/attention/scheduler.cuh) simulated for one causal request with a sliding
window: it estimates each (query head, query tile)'s cost as 2 * CTA_Q + the keys a causal tile
reads (the window is not passed to it) and gives each, last tile first, to the CTA with the least
estimated cost so far. This compares the busiest CTA's real cost (the window's keys) with an even
split, for that estimate, for one that prices every tile alike (a plan made as not causal: what
planning/ragged.py's balanced schedule does) and for one that knows the window (issue 22's lead);
with several widths, heads cycling through them (the bench's per-head windows).

    python scripts/fa3_schedule_sim.py
"""
import heapq


def makespan_over_even(seq_len: int, window, heads: int = 32, ctas: int = 132, tile: int = 128,
                       price: str = "causal") -> float:
    """window: one width, or a tuple the heads cycle through; price: "causal" (FlashInfer's
    estimate), "flat" (planned as not causal) or "window" (an estimate that knows each width)."""
    widths = window if isinstance(window, tuple) else (window,)
    heap = [(0, c) for c in range(ctas)]
    real = [0] * ctas
    for h in range(heads):
        width = widths[h % len(widths)]
        for t in range(-(-seq_len // tile) - 1, -1, -1):
            estimated, cta = heapq.heappop(heap)
            causal_keys = min(seq_len, (t + 1) * tile)
            window_keys = causal_keys - max(0, t * tile - (width - 1))
            keys = {"causal": causal_keys, "flat": seq_len, "window": window_keys}[price]
            heapq.heappush(heap, (estimated + 2 * tile + keys, cta))
            real[cta] += 2 * tile + window_keys
    return max(real) / (sum(real) / ctas)


if __name__ == "__main__":
    for window in (1024, (128, 256, 512, 1024)):
        for seq_len in (8192, 32768):
            for tile in (128, 192):   # FlashInfer's query tile at head_dim 128 and 64
                prices = ", ".join(f"{price} {makespan_over_even(seq_len, window, tile=tile, price=price):.3f}"
                                   for price in ("causal", "flat", "window"))
                print(f"window {window}, {seq_len} tokens, tiles of {tile}, 32 heads, 132 CTAs: "
                      f"busiest CTA / even split priced {prices}")
