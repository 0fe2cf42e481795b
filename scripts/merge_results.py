"""Merge the JSON of benchmark runs (the GPU pipeline's $run_dir/*.json) into a results file, in
the order given: a row replaces the file's row of the same (case, seq_len, head_dim, impl).
    python3 scripts/merge_results.py benchmarks/results/NVIDIA_H200.json run/bench-32k.json ..."""
import json
import sys

target, sources = sys.argv[1], sys.argv[2:]
res = json.load(open(target))
def key(r): return (r["case"], r.get("seq_len", r.get("total_tokens")), r.get("head_dim"), r["impl"])
for src in sources:
    new = json.load(open(src))
    assert new["device"] == res["device"], (new["device"], res["device"])
    rows = new["rows"] + new.get("other_rows", [])
    keys = {key(r) for r in rows}
    for field in ("rows", "other_rows"):
        if field in res:
            res[field] = [r for r in res[field] if key(r) not in keys]
    spec = [r for r in new["rows"]]
    res.setdefault("rows", []).extend(spec)
    res.setdefault("other_rows", []).extend(new.get("other_rows", []))
    for f in ("torch", "flashinfer", "date"):
        if f in new: res[f] = new[f]
json.dump(res, open(target, "w"), indent=1)
print("merged", len(sources), "files into", target)
