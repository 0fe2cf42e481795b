"""flex_flash_infer.tools.plot and the `show` / `info` commands: what is drawn is the mask, pixel for pixel."""
import sys

import numpy as np
import pytest
import torch

from flex_flash_infer.tools import cli
from flex_flash_infer import create_block_mask, create_mask, get_mask_fn
from flex_flash_infer.masks.block_build import EMPTY, FULL, PARTIAL

matplotlib = pytest.importorskip("matplotlib")
from matplotlib.colors import to_rgb  # noqa: E402
from matplotlib.image import imread  # noqa: E402

from flex_flash_infer.tools import plot as plot_module  # noqa: E402
from flex_flash_infer.tools.plot import plot  # noqa: E402


def custom_mask_fn(q_idx, kv_idx):          # the seed's 2-argument form
    return (q_idx >= kv_idx) & ((q_idx - kv_idx) % 3 == 0)


def cell_colors(fig, png, rows, cols):
    """RGB of the saved PNG at the centre of every drawn cell (element or tile) [rows, cols, 3]."""
    ax = fig.axes[0]
    height = png.shape[0]
    assert png.shape[:2] == (round(fig.get_figheight() * fig.dpi), round(fig.get_figwidth() * fig.dpi))
    q, kv = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    xy = ax.transData.transform(np.stack([kv.ravel(), q.ravel()], axis=1))   # display pixels, origin bottom left
    x = np.floor(xy[:, 0]).astype(int)
    y = height - 1 - np.floor(xy[:, 1]).astype(int)
    assert ax.yaxis_inverted() and not ax.xaxis_inverted()      # query 0 on top, key 0 on the left
    box = ax.get_window_extent()
    assert x.min() > box.x0 and x.max() < box.x1 and (height - y).min() > box.y0 and (height - y).max() < box.y1
    return png[y, x, :3].reshape(rows, cols, 3)


def luminance(rgb):
    return rgb @ np.array([0.2126, 0.7152, 0.0722])


# each mask's pattern written out here (plot draws with the library's create_mask, which must not be its own oracle)
EXPECTED = {
    "attamba": lambda q, kv: (q >= kv) & (((kv + 1) % 4 == 0) | (q - kv < 8)),
    "custom": lambda q, kv: (q >= kv) & ((q - kv) % 3 == 0),
    "streaming": lambda q, kv: (q >= kv) & ((kv < 2) | (q - kv < 5)),
}


@pytest.mark.parametrize("mask_fn, L, S, name", [
    (get_mask_fn("attamba", window_size=8, chunk_size=4), 40, 40, "attamba"),
    (custom_mask_fn, 40, 40, "custom"),
    (get_mask_fn("streaming", sink_size=2, window_size=5), 24, 36, "streaming"),
])
def test_element_mask_is_drawn_exactly(tmp_path, mask_fn, L, S, name):
    path = tmp_path / "mask.png"
    fig = plot(mask_fn, seq_len=L, kv_len=S, path=path)
    dense = EXPECTED[name](np.arange(L).reshape(-1, 1), np.arange(S).reshape(1, -1))
    assert 0 < dense.sum() < dense.size
    drawn = np.asarray(fig.axes[0].images[0].get_array())
    assert drawn.shape == (L, S) and np.array_equal(drawn, dense)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "key position (kv_idx)" and ax.get_ylabel() == "query position (q_idx)"
    assert mask_fn.__name__ in ax.get_title() and f"{L} x {S}" in ax.get_title()

    assert path.is_file() and path.stat().st_size > 0
    png = imread(path)
    lum = luminance(png[..., :3])
    assert (lum < 0.3).any() and (lum > 0.9).any()            # dark and light pixels
    cells = luminance(cell_colors(fig, png, L, S))
    assert np.array_equal(cells < 0.5, dense)                 # visible is dark, in every cell


def test_element_title_names_the_parameters_and_custom_title():
    fig = plot(get_mask_fn("attamba", window_size=8, chunk_size=4), seq_len=16)
    assert fig.axes[0].get_title().startswith("attamba_w8_c4")
    fig = plot(custom_mask_fn, seq_len=16, title="my mask")
    assert fig.axes[0].get_title() == "my mask"


def test_long_mask_draws_the_launches_of_its_plan(tmp_path):
    def sinks_and_window(b, h, q_idx, kv_idx):   # 600 sink keys: too many to gather, the tiles route
        return (q_idx >= kv_idx) & ((kv_idx < 600) | (q_idx - kv_idx < 700))

    path = tmp_path / "sinks.png"
    fig = plot(sinks_and_window, seq_len=4096, path=path)
    block_mask = create_block_mask(sinks_and_window, 1, 1, 4096, 4096, device="cpu", BLOCK_SIZE=128)
    states = block_mask.states[0, 0].numpy()
    assert states.shape == (32, 32) and {EMPTY, PARTIAL, FULL} == set(np.unique(states).tolist())
    ax = fig.axes[0]
    drawn = np.asarray(ax.images[0].get_array())
    # the tiles route: launch 1 runs the full tiles, launch 2 the partial ones, 3 merges them
    assert np.array_equal(drawn, np.select([states == FULL, states == PARTIAL], [1, 2], 0))
    title = ax.get_title()
    assert f"sparsity {block_mask.sparsity():.2f}%" in title and "68.95%" in title    # 706 of 1024 tiles
    assert "sinks_and_window" in title and "4096 x 4096" in title and "route: tiles" in title
    assert "tile" in ax.get_xlabel() and "tile" in ax.get_ylabel()
    legend = [" ".join(t.get_text().split()) for t in fig.legends[0].get_texts()]   # entries wrap
    assert legend[0].startswith("1. tiles: whole-tile prefill (unmasked)") and legend[1].startswith("2. tiles: paged prefill with a bit mask")
    assert legend[2] == f"empty (skipped): {int((states == EMPTY).sum())} tiles"
    for label, state in zip(legend, (FULL, PARTIAL)):
        assert label.endswith(f": {int((states == state).sum())} tiles")

    colors = cell_colors(fig, imread(path), 32, 32)
    for n, color in ((0, plot_module.EMPTY_COLOR), (1, plot_module.LAUNCH_COLORS[0]), (2, plot_module.LAUNCH_COLORS[1])):
        assert np.abs(colors[drawn == n] - np.array(to_rgb(color))).max() < 0.02


def test_attamba_shows_its_window_band_and_its_key_columns_apart(tmp_path):
    attamba = get_mask_fn("attamba", window_size=256, chunk_size=512)
    fig = plot(attamba, seq_len=4096, path=tmp_path / "attamba.png")
    drawn = np.asarray(fig.axes[0].images[0].get_array())
    states = create_block_mask(attamba, 1, 1, 4096, 4096, device="cpu").states[0, 0].numpy()
    assert np.array_equal(drawn != 0, states != EMPTY)
    columns = drawn == 2   # the key columns' launch: tiles of the chunk ends left of each row's window
    assert columns.any() and set(np.nonzero(columns.any(0))[0].tolist()) == {3, 7, 11, 15, 19, 23, 27}
    assert "route: bands+columns" in fig.axes[0].get_title()
    legend = [" ".join(t.get_text().split()) for t in fig.legends[0].get_texts()]   # entries wrap
    # the columns flex_attention gathers: every chunk end (the last one inside every window that sees it)
    assert legend[0].startswith("1. FlashInfer prefill") and legend[1].startswith("2. 8 key columns")


def test_a_lowered_mask_shows_its_tiles_as_one_native_call(tmp_path):
    causal = get_mask_fn("causal")
    fig = plot(causal, seq_len=4096, path=tmp_path / "causal.png")
    states = create_block_mask(causal, 1, 1, 4096, 4096, device="cpu").states[0, 0].numpy()
    drawn = np.asarray(fig.axes[0].images[0].get_array())
    assert np.array_equal(drawn == 1, states != EMPTY) and np.array_equal(drawn == 0, states == EMPTY)
    assert "route: bands" in fig.axes[0].get_title()
    legend = [" ".join(t.get_text().split()) for t in fig.legends[0].get_texts()]   # entries wrap
    assert legend[0].startswith("1. FlashInfer prefill, one launch") and legend[0].endswith(": 528 tiles")


def test_max_pixels_and_block_size_choose_the_drawing():
    window = get_mask_fn("sliding_window", window_size=16)
    assert np.asarray(plot(window, seq_len=64, max_pixels=64).axes[0].images[0].get_array()).shape == (64, 64)
    fig = plot(window, seq_len=64, kv_len=65, max_pixels=64, block_size=16)
    assert np.asarray(fig.axes[0].images[0].get_array()).shape == (4, 5)
    assert "16x16 tiles" in fig.axes[0].get_title()


def test_block_mask_is_drawn_as_its_tile_map():
    def per_head(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & ((h == 0) | (q_idx - kv_idx < 32))

    block_mask = create_block_mask(per_head, None, 2, 300, 400, device="cpu", BLOCK_SIZE=64)
    fig = plot(block_mask)
    drawn = np.asarray(fig.axes[0].images[0].get_array())
    assert np.array_equal(drawn != 0, block_mask.states[0, 0].numpy() != EMPTY)
    title = fig.axes[0].get_title()
    assert "per_head (batch 0, head 0)" in title and "300 x 400" in title and "64x64 tiles" in title
    torch_fig = plot(block_mask.to_torch())                   # torch's BlockMask too
    assert np.array_equal(np.asarray(torch_fig.axes[0].images[0].get_array()), drawn)
    with pytest.raises(ValueError, match="seq_lengths"):
        plot(block_mask, seq_len=200)


def test_bad_arguments():
    with pytest.raises(ValueError, match="seq_len"):
        plot(get_mask_fn("causal"))
    with pytest.raises(TypeError):
        plot(lambda q_idx: q_idx > 0, seq_len=8)


def test_missing_matplotlib_says_how_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot(get_mask_fn("causal"), seq_len=8)
    assert cli.main(["show", "causal", "-o", str(tmp_path / "x.png")]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_cli_show_writes_the_file_and_prints_its_path(tmp_path, capsys):
    out = tmp_path / "attamba.png"
    assert cli.main(["show", "attamba", "--window-size", "256", "--chunk-size", "128", "--seq-len", "2048",
                     "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert out.is_file() and out.stat().st_size > 0
    assert imread(out).shape[2] in (3, 4)


def test_cli_show_small_mask_and_default_name(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["show", "dilated_sliding_window", "--window-size", "6", "--dilation", "3",
                     "--seq-len", "30"]) == 0
    assert capsys.readouterr().out.strip() == "dilated_sliding_window.png"
    assert (tmp_path / "dilated_sliding_window.png").stat().st_size > 0


def test_cli_show_refuses_document_and_bad_parameters(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["show", "document"])
    assert e.value.code == 2
    assert cli.main(["show", "sliding_window", "--window-size", "0", "-o", "unused.png"]) == 2
    assert "window_size" in capsys.readouterr().err


def test_cli_info(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("FLASHINFER_WORKSPACE_BASE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "flashinfer", None)      # as on a machine without flashinfer
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    import flex_flash_infer

    assert f"flex_flash_infer {flex_flash_infer.__version__}" in out
    assert f"torch {torch.__version__}" in out
    assert "flashinfer: does not import" in out
    cache = tmp_path / ".cache" / "flashinfer"
    assert f"{cache} (does not exist" in out
    backend = next(line for line in out.splitlines() if line.startswith("backend 'auto'"))
    assert "reference" in backend                              # no flashinfer: reference everywhere
    if not torch.cuda.is_available():
        assert "CUDA available: no" in out

    (cache / "90a").mkdir(parents=True)
    for name in ("a.so", "90a/b.so", "90a/c.o"):
        (cache / name).write_bytes(b"")
    assert cli.main(["info"]) == 0
    assert f"{cache} (exists, 2 .so files)" in capsys.readouterr().out


def test_cli_info_as_is(capsys):
    """On this machine as it is (flashinfer or not): the CPU test machine reports the reference backend."""
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert torch.__version__ in out
    if not torch.cuda.is_available():
        assert "backend 'auto': reference" in out


@pytest.mark.parametrize("name,params", [("attamba", {"window_size": 256, "chunk_size": 128}),
                                         ("sliding_window", {"window_size": 256}),
                                         ("streaming", {"sink_size": 4, "window_size": 256})])
def test_tile_map_legend_fits_the_figure_whole(name, params, tmp_path):
    """The README's `show` figure: entries ran past the right edge (a launch's tile count cut
    off) and were cut at 70 characters ("(causal, window 256)" lost its window)."""
    fig = plot(get_mask_fn(name, **params), seq_len=2048, path=str(tmp_path / "tiles.png"))
    renderer = fig.canvas.get_renderer()
    texts = fig.legends[0].get_texts()
    assert all(t.get_window_extent(renderer).x1 <= fig.bbox.width for t in texts)
    labels = [" ".join(t.get_text().split()) for t in texts]
    assert all("..." not in label and label.endswith(" tiles") for label in labels)
    if name != "attamba":
        assert any("window 256" in label for label in labels)
