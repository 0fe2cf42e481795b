"""Full (bidirectional) attention.

Predicate: visible(q, kv) = True
"""


def generate_full_mask_mod():
    def full(b, h, q_idx, kv_idx):
        return (q_idx >= 0) | (kv_idx >= 0)

    return full
