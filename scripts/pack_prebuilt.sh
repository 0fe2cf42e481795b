#!/usr/bin/env bash
# Pack the prebuilt FlashInfer modules (.aot/, 1-5 MB each) as xz (about a quarter of that), so that
# they travel with the wheels within a call's 64 MiB; scripts/gpu_env.sh unpacks every pack.
#   bash scripts/pack_prebuilt.sh
# Modules already in a pack are left out: each run makes the next pack (.aotpack, .aotpack2, ...),
# so that packs too large for one call together can travel in two calls to the same warm machine
# (an ignored path carried by the first call stays there).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .aot ] || { echo "no .aot/: run scripts/prebuild_kernels.sh first" >&2; exit 2; }
packed=$(for p in .aotpack*/aot.tar.xz; do [ -f "$p" ] && tar -tJf "$p"; done | grep '\.so$' | cut -d/ -f1 || true)
# complete modules only (a directory holding its .so: a build cut short leaves none), not packed yet
mods=$(cd .aot && for d in */; do d=${d%/}; [ -f "$d/$d.so" ] && ! grep -qx "$d" <<<"$packed" && echo "$d"; done || true)
[ -n "$mods" ] || { echo "nothing new to pack"; exit 0; }
n=1; dir=.aotpack; while [ -e "$dir" ]; do n=$((n + 1)); dir=.aotpack$n; done
mkdir -p "$dir"
tar -cf - -C .aot $mods | xz -T0 -6 > "$dir/aot.tar.xz"
echo "$dir: $(echo "$mods" | wc -w) modules, $(du -h "$dir/aot.tar.xz" | cut -f1)"
