"""scripts/prebuild_kernels.py: the library's compiled variants it would build ahead on a CPU
machine are the ones the library itself asks FlashInfer for, and the replay leaves no patch behind."""
import importlib.util
import pathlib
import sys

import torch

from flex_flash_infer.backends import backend_choice, flashinfer_backend
from flex_flash_infer import paged
from flex_flash_infer.tools.warmup import example_score_mod
from flex_flash_infer.core.trace import trace
from flex_flash_infer.compile.variant import fa3_score_mod_variant
from flex_flash_infer.compile.codegen import position_bound_for

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "prebuild_kernels.py"


def load_script():
    spec = importlib.util.spec_from_file_location("prebuild_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_replayed_warmup_kinds_name_the_library_variants_and_restore_everything():
    prebuild = load_script()
    before = (flashinfer_backend._is_hopper, flashinfer_backend.unsupported_reason, backend_choice.unsupported_reason,
              paged._is_hopper, sys.modules.get("flashinfer"))
    kinds = ["score_mod:softcap", "tile_variants:softcap", "score_mod_fa2:alibi"]
    recorded = prebuild.custom_jit_args(kinds, torch.bfloat16, 128)
    uris = [args[0] for _, args in recorded]
    after = (flashinfer_backend._is_hopper, flashinfer_backend.unsupported_reason, backend_choice.unsupported_reason,
             paged._is_hopper, sys.modules.get("flashinfer"))
    assert all(a is b for a, b in zip(before, after))
    # the softcap band variant: the name ScoreModBands gives it (the hash of its generated code)
    import hashlib
    spec = fa3_score_mod_variant(trace(example_score_mod("softcap", 4, device="cpu"), "score_mod"),
                                 position_bound_for(1, 4, 256, 256))
    softcap_uri = f"ffi_{hashlib.sha256(spec.decl.encode()).hexdigest()[:16]}_bfloat16_d128_noswa"
    assert uris[0] == softcap_uri and recorded[0][0] == "fa3"
    # tiles: a fa3 full-tile and a fa2 partial-tile variant for softcap
    paged_uris = [u for u in uris if u.startswith("ffi_paged_")]
    assert len(paged_uris) == 2 and all(u.endswith("_bfloat16_d128") for u in paged_uris)
    fa2 = [(backend, u) for backend, u in zip((b for b, _ in recorded), uris) if u.startswith("ffi_fa2_")]
    assert fa2 and all(backend == "fa2" for backend, _ in fa2)
    assert len(set(uris)) == len(uris)


def test_paged_kinds_record_their_variants_and_restore_everything():
    """paged_mods plans the paged cache's cases: it records the variants the GPU would build, and
    every patch is undone."""
    prebuild = load_script()
    before = (paged.unsupported_reason, paged._is_hopper, flashinfer_backend.FlashInferPlan.run,
              sys.modules.get("flashinfer"))
    paged_uris = [args[0] for _, args in prebuild.custom_jit_args(["paged_mods"], torch.bfloat16, 128)]
    after = (paged.unsupported_reason, paged._is_hopper, flashinfer_backend.FlashInferPlan.run,
             sys.modules.get("flashinfer"))
    assert all(a is b for a, b in zip(before, after))
    # fa2 mask-in-kernel with and without alibi for the per-head windows; the soft-capped cases run
    # FlashInfer's own logits_soft_cap (native_soft_cap.py), which compiles no variant
    assert len(paged_uris) == 2 and len(set(paged_uris)) == 2


def test_shell_scripts_parse():
    """The GPU machine runs these unattended: a syntax slip would cost a lent machine's time."""
    import subprocess

    scripts = sorted((SCRIPT.parent).glob("*.sh"))
    assert scripts
    for script in scripts:
        done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert done.returncode == 0, (script.name, done.stderr)


def test_every_default_kind_replays():
    """The default list (what `prebuild_kernels.sh` builds) replays without error: a route that
    calls a FlashInfer function the stand-in lacks (merge_state_in_place, for the relative-position
    split) would end the listing there."""
    prebuild = load_script()
    recorded = prebuild.custom_jit_args(list(prebuild.CUSTOM_KINDS), torch.bfloat16, 128)
    uris = [args[0] for _, args in recorded]
    assert len(set(uris)) == len(uris) and any(u.endswith("_swa") for u in uris)
