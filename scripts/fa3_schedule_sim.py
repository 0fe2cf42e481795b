"""FlashInfer 0.7.2's Hopper ragged-prefill scheduler (PrefillSM90Plan in
include/flashinfer/attention/scheduler.cuh) simulated for one causal request with a sliding
window: it estimates each (query head, query tile)'s cost as 2 * CTA_Q + the keys a causal tile
reads (the window is not passed to it) and gives each, last tile first, to the CTA with the least
estimated cost so far. This compares the busiest CTA's real cost (the window's keys) with an even
split, for that estimate and for one that knows the window (issue 22's lead).

    python scripts/fa3_schedule_sim.py
"""
import heapq


def makespan_over_even(seq_len: int, window: int, heads: int = 32, ctas: int = 132, tile: int = 128,
                       knows_window: bool = False) -> float:
    heap = [(0, c) for c in range(ctas)]
    real = [0] * ctas
    for _ in range(heads):
        for t in range(-(-seq_len // tile) - 1, -1, -1):
            estimated, cta = heapq.heappop(heap)
            causal_keys = min(seq_len, (t + 1) * tile)
            window_keys = causal_keys - max(0, t * tile - (window - 1))
            heapq.heappush(heap, (estimated + 2 * tile + (window_keys if knows_window else causal_keys), cta))
            real[cta] += 2 * tile + window_keys
    return max(real) / (sum(real) / ctas)


if __name__ == "__main__":
    for seq_len in (8192, 32768):
        print(f"{seq_len} tokens, window 1024, 32 heads, 132 CTAs: busiest CTA / even split "
              f"{makespan_over_even(seq_len, 1024):.3f} as FlashInfer estimates, "
              f"{makespan_over_even(seq_len, 1024, knows_window=True):.3f} knowing the window")
