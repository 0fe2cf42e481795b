"""The seed README's own words keep working: its snippets and its test command, as written.

The seed's code blocks are copied here verbatim (SEED_* below), so these tests run wherever the
repository does; when the seed itself is at hand (../shared/seed/README.md) a test checks the
copies still equal it. The only substitutions are the ones the seed cannot run without: the
device where there is no GPU, and the `...` standing for the quick start's arguments.
"""
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import flex_attention as torch_flex

from flex_flash_infer import FlexFlashInfer, and_masks, create_block_mask, create_mask, get_mask_fn, or_masks
from flex_flash_infer.tools import cli
from flex_flash_infer.mods import MASK_FACTORIES
from flex_flash_infer.mods._seed_form import BatchOrHeadDependent
from flex_flash_infer.compile.codegen import graph_key

REPO = pathlib.Path(__file__).resolve().parents[2]
SEED_PLACES = [REPO / "shared" / "seed" / "README.md", REPO.parent / "shared" / "seed" / "README.md"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

SEED_QUICK_START = '''import torch
from flex_flash_infer import FlexFlashInfer, get_mask_fn

# Initialize the wrapper
flex_flash = FlexFlashInfer(device="cuda")

# Prepare with causal mask
flex_flash.prepare(
    mask_fn=get_mask_fn("causal"),
    seq_len_q=1024,        # Query sequence length
    seq_len_kv=1024,       # Key/Value sequence length
    num_qo_heads=8,        # Number of query heads
    num_kv_heads=8,        # Number of key/value heads
    head_dim=64,          # Head dimension
    block_size_row=64,    # Block size for sparse computation
    block_size_col=64,
    dtype=torch.float16
)

# Create input tensors
q = torch.randn((1024, 8, 64), dtype=torch.float16, device="cuda")
k = torch.randn((1024, 8, 64), dtype=torch.float16, device="cuda")
v = torch.randn((1024, 8, 64), dtype=torch.float16, device="cuda")

# Run attention
output = flex_flash(q, k, v)
'''

SEED_MASK_TYPES = '''# Causal mask
mask_fn = get_mask_fn("causal")

# Sliding window with causality
mask_fn = get_mask_fn("sliding_window", window_size=256)

# Attamba mask (chunk-based attention)
mask_fn = get_mask_fn("attamba", window_size=256, chunk_size=128)
'''

SEED_CUSTOM_MASK = '''def custom_mask_fn(q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    # Define your custom attention pattern
    return (q_idx >= kv_idx) & (q_idx - kv_idx <= 256)

flex_flash.prepare(mask_fn=custom_mask_fn, ...)
'''

SEED_COMMAND = "python test_flex_flash.py --q_len 1024 --kv_len 1024 --num_qo_heads 8 --mask_type causal"

# each library mask's predicate, as its module docstring states it (the seed's two-argument form)
PREDICATES = {
    "full": ({}, lambda q, kv: torch.ones_like(q - kv, dtype=torch.bool)),
    "causal": ({}, lambda q, kv: q >= kv),
    "sliding_window": ({"window_size": 5}, lambda q, kv: (q >= kv) & (q - kv < 5)),
    "attamba": ({"window_size": 5, "chunk_size": 4},
                lambda q, kv: (q >= kv) & (((kv + 1) % 4 == 0) | (q - kv < 5))),
    "streaming": ({"sink_size": 2, "window_size": 5}, lambda q, kv: (q >= kv) & ((kv < 2) | (q - kv < 5))),
    "prefix_lm": ({"prefix_len": 6}, lambda q, kv: (kv < 6) | (q >= kv)),
    "document": ({"offsets": [0, 7, 20, 40]},
                 lambda q, kv: ((q >= 7).long() + (q >= 20).long() == (kv >= 7).long() + (kv >= 20).long()) & (q >= kv)),
    "chunked_causal": ({"chunk_size": 8}, lambda q, kv: (q >= kv) & (q // 8 == kv // 8)),
    "dilated_sliding_window": ({"window_size": 6, "dilation": 3},
                               lambda q, kv: ((q - kv).abs() <= 6) & ((q - kv).abs() % 3 == 0)),
}


def on_this_machine(code: str) -> str:
    return code.replace('device="cuda"', f'device="{DEVICE}"')


def sdpa(q, k, v, mask_fn):
    """PyTorch SDPA given the dense mask of a two-argument mask_fn (as the seed's test compares)."""
    q_idx, kv_idx = torch.arange(q.shape[0], device=q.device), torch.arange(k.shape[0], device=q.device)
    dense = mask_fn(q_idx[:, None], kv_idx[None, :]).expand(q.shape[0], k.shape[0])
    return cli.sdpa_reference(q, k, v, dense)


def relative_error(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


# ----- the seed's text ----------------------------------------------------------------------

def test_the_copies_are_the_seeds_words():
    seed = next((p for p in SEED_PLACES if p.is_file()), None)
    if seed is None:
        pytest.skip("the seed README is not next to this checkout")
    text = seed.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks == [SEED_QUICK_START, SEED_MASK_TYPES, SEED_CUSTOM_MASK]
    assert SEED_COMMAND in re.findall(r"```bash\n(.*?)```", text, flags=re.S)[-1]


# ----- Quick Start ----------------------------------------------------------------------------

def test_quick_start_runs_as_written_and_matches_sdpa():
    namespace = {}
    exec(compile(on_this_machine(SEED_QUICK_START), "seed README quick start", "exec"), namespace)
    output, q, k, v = (namespace[n] for n in ("output", "q", "k", "v"))
    assert output.shape == (1024, 8, 64) and output.dtype == torch.float16 and output.device.type == DEVICE
    assert torch.isfinite(output).all()
    assert relative_error(output, sdpa(q, k, v, lambda qi, ki: qi >= ki)) <= 1e-2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_quick_start_device_cuda_without_cuda_says_so():
    with pytest.raises(ValueError, match=r"CUDA is not available; use device='cpu'"):
        exec(compile(SEED_QUICK_START, "seed README quick start", "exec"), {})


# ----- Supported Mask Types and the two-argument mask_fn --------------------------------------

def test_mask_types_block_runs_and_each_mask_is_a_two_argument_mask_fn():
    namespace = {"get_mask_fn": get_mask_fn}
    exec(compile(SEED_MASK_TYPES, "seed README mask types", "exec"), namespace)
    q_idx, kv_idx = torch.arange(600)[:, None], torch.arange(600)[None, :]
    expected = (q_idx >= kv_idx) & (((kv_idx + 1) % 128 == 0) | (q_idx - kv_idx < 256))
    assert torch.equal(namespace["mask_fn"](q_idx, kv_idx), expected)


@pytest.mark.parametrize("name", sorted(MASK_FACTORIES))
def test_every_library_mask_answers_both_ways_alike(name):
    params, predicate = PREDICATES[name]
    mask = get_mask_fn(name, **params)
    q_idx, kv_idx = torch.arange(40)[:, None], torch.arange(40)[None, :]
    two = mask(q_idx, kv_idx).expand(40, 40)
    assert torch.equal(two, predicate(q_idx, kv_idx))
    b, h = torch.zeros(2, 1, 1, 1, dtype=torch.int32), torch.arange(3, dtype=torch.int32).view(1, 3, 1, 1)
    four = mask(b, h, q_idx.view(1, 1, 40, 1), kv_idx.view(1, 1, 1, 40))
    assert torch.equal(four.expand(2, 3, 40, 40), two.expand(2, 3, 40, 40))
    # keywords, 0-d tensors and Python ints, as a user may pass them
    assert torch.equal(mask(q_idx=q_idx, kv_idx=kv_idx).expand(40, 40), two)
    assert bool(mask(torch.tensor(30), torch.tensor(29))) == bool(two[30, 29])
    assert bool(mask(30, 29)) == bool(two[30, 29])


@pytest.mark.parametrize("name", ["causal", "sliding_window", "attamba", "document"])
def test_library_masks_keep_their_name_hints_and_four_argument_signature(name):
    import inspect

    from flex_flash_infer.core.mask_eval import count_positional_args
    from flex_flash_infer.core.trace import trace

    mask = get_mask_fn(name, **PREDICATES[name][0])
    assert count_positional_args(mask) == 4
    assert list(inspect.signature(mask).parameters) == ["b", "h", "q_idx", "kv_idx"]
    assert any(hasattr(mask, hint) for hint in ("band_hint", "key_columns_hint", "document_ids"))
    assert not hasattr(mask, "__code__")       # torch then counts the signature, not co_argcount
    assert name in repr(mask)
    graph = trace(mask, "mask_mod")
    # captured numbers stay kernel parameters (trace.py), as for the unwrapped mask
    assert sorted(value for *_, value in graph.scalars) == sorted(
        v for v in PREDICATES[name][0].values() if isinstance(v, int))
    unwrapped = trace(MASK_FACTORIES[name](**PREDICATES[name][0]), "mask_mod")
    assert graph_key(graph) == graph_key(unwrapped)       # the same compiled module as before the wrapping


def test_wrong_argument_counts_say_both_forms():
    mask = get_mask_fn("causal")
    with pytest.raises(TypeError, match=r"\(q_idx, kv_idx\) or \(b, h, q_idx, kv_idx\); got 3 arguments"):
        mask(torch.tensor(0), torch.tensor(1), torch.tensor(2))
    with pytest.raises(TypeError, match=r"got keywords \['b', 'h'\]"):
        mask(b=torch.tensor(0), h=torch.tensor(0))


def test_a_mask_reading_b_or_h_has_no_two_argument_form():
    q_idx, kv_idx = torch.arange(8)[:, None], torch.arange(8)[None, :]
    by_head = and_masks(get_mask_fn("causal"), lambda b, h, q, kv: h < 2)
    by_batch = or_masks(get_mask_fn("sliding_window", window_size=3), lambda b, h, q, kv: b == 1)
    for mask in (by_head, by_batch):
        with pytest.raises(BatchOrHeadDependent, match=r"depends on the batch or head index.*mask_mod\(b, h, q_idx, kv_idx\)"):
            mask(q_idx, kv_idx)
        with pytest.raises(BatchOrHeadDependent):       # the 0-d indices of torch's vmap too
            mask(torch.tensor(3), torch.tensor(2))
    b, h = torch.arange(2).view(2, 1, 1, 1), torch.arange(4).view(1, 4, 1, 1)
    out = by_head(b, h, q_idx.view(1, 1, 8, 1), kv_idx.view(1, 1, 1, 8)).expand(2, 4, 8, 8)
    assert torch.equal(out[:, :2], (q_idx >= kv_idx).expand(2, 2, 8, 8)) and not out[:, 2:].any()


def test_combinators_take_the_seed_form_and_give_it():
    q_idx, kv_idx = torch.arange(50)[:, None], torch.arange(50)[None, :]
    custom = lambda q, kv: (q - kv) % 3 == 0       # noqa: E731  the seed's two-argument style
    both = and_masks(get_mask_fn("causal"), custom)
    either = or_masks(custom, get_mask_fn("prefix_lm", prefix_len=4))
    assert torch.equal(both(q_idx, kv_idx), (q_idx >= kv_idx) & ((q_idx - kv_idx) % 3 == 0))
    assert torch.equal(either(q_idx, kv_idx), ((q_idx - kv_idx) % 3 == 0) | (kv_idx < 4) | (q_idx >= kv_idx))
    # and the library takes them as mask_mods: their dense mask is the two-argument answer
    for mask in (both, either):
        assert torch.equal(create_mask(mask, 1, 1, 50, 50, device="cpu")[0, 0], mask(q_idx, kv_idx).expand(50, 50))
        assert create_block_mask(mask, None, None, 50, 50, device="cpu", BLOCK_SIZE=16).mask_mod is mask


def test_torch_flex_attention_takes_library_masks_in_both_forms():
    """torch counts a mask_mod's arguments; a library mask (or a mask_mod calling it with two
    arguments under torch's vmap) is accepted and gives the same tiles as its predicate."""
    L = 256
    window = get_mask_fn("sliding_window", window_size=40)
    composed = lambda b, h, q, kv: window(q, kv) & (q % 2 == 0)    # noqa: E731
    for mod, predicate in ((window, lambda q, kv: (q >= kv) & (q - kv < 40)),
                           (composed, lambda q, kv: (q >= kv) & (q - kv < 40) & (q % 2 == 0))):
        theirs = torch_flex.create_block_mask(mod, None, None, L, L, device="cpu", BLOCK_SIZE=32)
        plain = torch_flex.create_block_mask(lambda b, h, q, kv: predicate(q, kv), None, None, L, L, device="cpu",
                                             BLOCK_SIZE=32)
        assert torch.equal(theirs.kv_num_blocks, plain.kv_num_blocks)
        assert torch.equal(theirs.full_kv_num_blocks, plain.full_kv_num_blocks)


# ----- the custom mask_fn ----------------------------------------------------------------------

def test_custom_mask_fn_block_runs_and_matches_sdpa():
    """The seed's `...` stands for the quick start's arguments; here a smaller problem."""
    code = SEED_CUSTOM_MASK.replace(
        "flex_flash.prepare(mask_fn=custom_mask_fn, ...)",
        "flex_flash.prepare(mask_fn=custom_mask_fn, seq_len_q=600, seq_len_kv=600, num_qo_heads=4, num_kv_heads=2,"
        " head_dim=64, block_size_row=64, block_size_col=64, dtype=torch.float16)")
    assert code != SEED_CUSTOM_MASK
    namespace = {"torch": torch, "flex_flash": FlexFlashInfer(device=DEVICE)}
    exec(compile(code, "seed README custom mask", "exec"), namespace)
    q = torch.randn(600, 4, 64, dtype=torch.float16, device=DEVICE)
    k, v = (torch.randn(600, 2, 64, dtype=torch.float16, device=DEVICE) for _ in range(2))
    out = namespace["flex_flash"](q, k, v)
    assert relative_error(out, sdpa(q, k, v, namespace["custom_mask_fn"])) <= 1e-2


@pytest.mark.parametrize("name, params", [
    ("causal", {}), ("sliding_window", {"window_size": 256}), ("attamba", {"window_size": 256, "chunk_size": 128}),
])
def test_seed_masks_through_prepare_match_sdpa(name, params):
    flex = FlexFlashInfer(device=DEVICE)
    mask_fn = get_mask_fn(name, **params)
    flex.prepare(mask_fn=mask_fn, seq_len_q=700, seq_len_kv=700, num_qo_heads=4, num_kv_heads=4, head_dim=64,
                 block_size_row=64, block_size_col=64, dtype=torch.float16)
    q, k, v = (torch.randn(700, 4, 64, dtype=torch.float16, device=DEVICE) for _ in range(3))
    assert relative_error(flex(q, k, v), sdpa(q, k, v, mask_fn)) <= 1e-2


# ----- Testing: the seed's command ------------------------------------------------------------

def small(command: str) -> list:
    """The seed's command at 128 tokens (the flags as the seed spells them)."""
    args = command.split()[2:]
    return [a if a != "1024" else "128" for a in args]


def test_seed_command_runs_and_passes():
    assert SEED_COMMAND.startswith("python test_flex_flash.py ")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    result = subprocess.run([sys.executable, "test_flex_flash.py", *small(SEED_COMMAND)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "q_len 128, kv_len 128, 8 query / 8 key-value heads" in result.stdout
    assert re.search(r"^PASS: max abs error \S+, worst row's relative error \S+", result.stdout, flags=re.M), result.stdout
    backend = "flashinfer" if DEVICE == "cuda" else "reference"
    assert re.search(rf"^causal\s+{backend}\s+{DEVICE}\s", result.stdout, flags=re.M), result.stdout


def load_script():
    spec = importlib.util.spec_from_file_location("seed_test_script", REPO / "test_flex_flash.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mask_type, extra", [
    ("sliding_window", ["--window_size", "17"]),
    ("attamba", ["--window_size", "20", "--chunk_size", "16"]),
    ("streaming", ["--sink_size", "3", "--window_size", "20"]),
])
def test_script_takes_every_underscore_flag(capsys, mask_type, extra):
    argv = ["--q_len", "90", "--kv_len", "130", "--num_qo_heads", "4", "--num_kv_heads", "2", "--head_dim", "32",
            "--mask_type", mask_type, *extra]
    assert load_script().main(argv) == 0
    out = capsys.readouterr().out
    assert f"dense {mask_type} mask: q_len 90, kv_len 130, 4 query / 2 key-value heads, head_dim 32" in out
    assert "\nPASS: " in out
    assert cli.main(["check", *argv]) == 0             # the same flags on `python -m flex_flash_infer check`


def test_script_fails_loudly_with_exit_1(capsys, monkeypatch):
    class Perturbed(cli.FlexFlashInfer):
        def __call__(self, q, k, v, return_lse=False):
            return super().__call__(q, k, v, return_lse) * 1.01

    monkeypatch.setattr(cli, "FlexFlashInfer", Perturbed)
    assert load_script().main(["--q_len", "64", "--num_qo_heads", "2", "--head_dim", "16"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^FAIL: max abs error \S+, worst row's relative error \S+ \(a row's relative error above the", out, flags=re.M)


def test_script_bad_argument_exits_2_naming_it(capsys):
    assert load_script().main(["--q_len", "64", "--mask_type", "sliding_window", "--window_size", "0"]) == 2
    assert "test_flex_flash.py: window_size must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        load_script().main(["--mask_type", "nope"])
    assert e.value.code == 2
