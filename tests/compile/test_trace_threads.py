"""Traces made in several threads at once (the demo prepares its checks in threads; a server may
prepare from several) each keep their own captured numbers and tables: the tracer being filled is
the calling thread's own."""
import sys
import threading

import torch

from flex_flash_infer import get_mask_fn
from flex_flash_infer.core.trace import trace


def _trace_many(make, rounds, graphs, errors):
    try:
        for _ in range(rounds):
            graphs.append(trace(make(), "mask_mod"))
    except Exception as e:   # noqa: BLE001 - reported by the test
        errors.append(e)


def test_threads_tracing_at_once_keep_their_own_values():
    # a switch between threads every microsecond: the interleavings a real run meets rarely
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        table = torch.tensor([3, 5, 7])
        makers = {64: lambda: get_mask_fn("sliding_window", window_size=64),
                  300: lambda: get_mask_fn("sliding_window", window_size=300),
                  "table": lambda: (lambda b, h, q, kv: (q >= kv) & (q - kv < table[h % 3]))}
        graphs = {key: [] for key in makers}
        errors = []
        threads = [threading.Thread(target=_trace_many, args=(make, 300, graphs[key], errors))
                   for key, make in makers.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert not errors, errors[:3]
    for window in (64, 300):
        values = {tuple(v for _, _, v in g.scalars) for g in graphs[window]}
        assert values == {(window,)}, (window, values)
        assert all(not g.tensors for g in graphs[window])
    assert all(len(g.tensors) == 1 and g.tensors[0][1] is table and not g.scalars for g in graphs["table"])
