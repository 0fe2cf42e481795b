"""Draw a mask: the element mask of a small mask_mod, or the tile map of a long one or a BlockMask.

    from flex_flash_infer import get_mask_fn
    from flex_flash_infer.tools.plot import plot
    plot(get_mask_fn("attamba", window_size=8, chunk_size=4), seq_len=40, path="attamba.png")

Needs matplotlib (pip install matplotlib, or the package's "plot" extra). Only matplotlib's
object-oriented API and its Agg canvas are used: pyplot's global state and backend are left alone,
and the returned Figure displays in a notebook as any other.
"""
from __future__ import annotations

import os

import textwrap

import numpy as np

from ..block_mask import BlockMask, create_block_mask, create_mask
from ..core.mask_eval import as_mask_mod

VISIBLE_COLOR, HIDDEN_COLOR = "#08306b", "#f7f7f7"          # element mask: visible is dark
EMPTY_COLOR = "#f7f7f7"
# one colour per launch, in the plan's order (a plan has at most a handful; more reuse them)
LAUNCH_COLORS = ["#08306b", "#f4a442", "#2ca25f", "#9e3d8f", "#d7301f", "#41b6c4", "#807dba", "#737373"]
LEGEND_CHARS = 44   # a legend entry wraps at this width: the figure keeps 4.2 inches on the right for it


def _matplotlib():
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import BoundaryNorm, ListedColormap
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as e:
        raise ImportError("flex_flash_infer.tools.plot needs matplotlib: pip install matplotlib "
                          "(or pip install 'flex-flash-infer[plot]')") from e
    return FigureCanvasAgg, BoundaryNorm, ListedColormap, Figure, Patch


def _mask_name(mask_mod) -> str:
    name = getattr(mask_mod, "__name__", None) or type(mask_mod).__name__
    return "mask_mod" if name == "<lambda>" else name


def _figure(Figure, FigureCanvasAgg, rows: int, cols: int, right: float = 0.3):
    """A Figure with one axes of roughly the mask's aspect ratio (2.5 to 6 inches a side), laid out
    by hand with fixed margins in inches (room for labels, a two-line title and a legend on the
    right), so the saved PNG has the figure's exact size and pixel positions."""
    left, bottom, top = 0.9, 0.7, 0.8
    ratio = rows / cols
    width, height = (6.0, 6.0 * ratio) if ratio <= 1 else (6.0 / ratio, 6.0)
    width, height = max(width, 2.5), max(height, 2.5)
    fig_w, fig_h = left + width + right, bottom + height + top
    fig = Figure(figsize=(fig_w, fig_h), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((left / fig_w, bottom / fig_h, width / fig_w, height / fig_h))
    # a very elongated mask (e.g. a few decode queries against a long cache) fills the axes
    aspect = "equal" if 1 / 2.4 <= ratio <= 2.4 else "auto"
    return fig, ax, aspect


def _interpolation(ax, rows: int, cols: int) -> str:
    """Crisp cells while each gets a pixel or more; antialiased (thin lines stay visible) below."""
    box = ax.get_window_extent()
    return "nearest" if rows <= box.height and cols <= box.width else "antialiased"


def _integer_ticks(ax):
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def _draw_elements(mod, q_len: int, kv_len: int, title):
    FigureCanvasAgg, BoundaryNorm, ListedColormap, Figure, _ = _matplotlib()
    dense = create_mask(mod, 1, 1, q_len, kv_len, device="cpu")[0, 0]
    image = dense.numpy().astype(np.uint8)
    fig, ax, aspect = _figure(Figure, FigureCanvasAgg, q_len, kv_len)
    cmap = ListedColormap([HIDDEN_COLOR, VISIBLE_COLOR])
    ax.imshow(image, cmap=cmap, norm=BoundaryNorm([-0.5, 0.5, 1.5], 2), aspect=aspect,
              interpolation=_interpolation(ax, q_len, kv_len))
    _integer_ticks(ax)
    ax.set_xlabel("key position (kv_idx)")
    ax.set_ylabel("query position (q_idx)")
    visible = int(image.sum())
    ax.set_title(title or f"{_mask_name(mod)}  ({q_len} x {kv_len}: "
                          f"{100.0 * visible / image.size:.1f}% of pairs visible)")
    return fig


def _draw_tiles(block_mask: BlockMask, title):
    """The tile map of batch 0, head 0, each tile in the colour of the launch that computes it
    (the plan of BlockMask.plan(), as FlashInfer would run it), empty tiles pale."""
    FigureCanvasAgg, BoundaryNorm, ListedColormap, Figure, Patch = _matplotlib()
    B, H = block_mask.shape[:2]
    plan = block_mask.to("cpu").plan(num_qo_heads=H, num_kv_heads=H, batch=B, device="cpu")
    owners = plan.tile_map().numpy()
    labels = plan.launches()
    nq, nkv = owners.shape
    bq, bkv = block_mask.BLOCK_SIZE
    q_len, kv_len = block_mask.seq_lengths
    fig, ax, aspect = _figure(Figure, FigureCanvasAgg, nq, nkv, right=4.2)
    colors = [EMPTY_COLOR] + [LAUNCH_COLORS[(n - 1) % len(LAUNCH_COLORS)] for n in range(1, len(labels) + 1)]
    ax.imshow(owners, cmap=ListedColormap(colors), norm=BoundaryNorm(np.arange(len(colors) + 1) - 0.5, len(colors)),
              aspect=aspect, interpolation=_interpolation(ax, nq, nkv))
    _integer_ticks(ax)
    ax.set_xlabel(f"key tile index (kv_idx // {bkv})")
    ax.set_ylabel(f"query tile index (q_idx // {bq})")
    handles = []
    for n, label in enumerate(labels, 1):
        tiles = int((owners == n).sum())
        if tiles:   # a merge computes no tile
            # whole, wrapped: a launch's window or column count is what tells the routes apart
            text = textwrap.fill(f"{n}. {label}: {tiles} tiles", LEGEND_CHARS, subsequent_indent="    ")
            handles.append(Patch(facecolor=colors[n], edgecolor="#444444", label=text))
    empty = int((owners == 0).sum())
    handles.append(Patch(facecolor=EMPTY_COLOR, edgecolor="#444444", label=f"empty (skipped): {empty} tiles"))
    box = ax.get_position()
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(box.x1 + 0.1 / fig.get_figwidth(), box.y1),
               frameon=False, fontsize="x-small")
    where = " (batch 0, head 0)" if B > 1 or H > 1 else ""
    ax.set_title(title or f"{_mask_name(block_mask.mask_mod)}{where}\n{q_len} x {kv_len}, {bq}x{bkv} tiles, "
                          f"sparsity {100.0 * empty / owners.size:.2f}%, route: {plan.route}")
    return fig


def plot(mask_mod_or_block_mask, seq_len=None, kv_len=None, title=None, path=None, max_pixels=1024,
         block_size=128):
    """Draw a mask and return the matplotlib Figure (saved as a PNG when path is given).

    A mask_mod(b, h, q_idx, kv_idx) or the seed's mask_fn(q_idx, kv_idx) needs seq_len (kv_len
    defaults to seq_len). When both lengths are at most max_pixels it draws the element mask
    (batch 0, head 0; visible pairs dark); otherwise it builds create_block_mask(...,
    BLOCK_SIZE=block_size) and draws the tile map in the colours of the launches that compute each
    tile (the plan FlashInfer would run: print(block_mask.plan()) lists them), with the route and
    the sparsity (percentage of tiles skipped) in the title. A BlockMask (ours or torch's)
    is drawn as its tile map for batch 0, head 0; seq_len / kv_len, if given, must match it.
    title replaces the default title (the mask's __name__, e.g. "attamba_w256_c128", and size).
    """
    _matplotlib()  # fail early, before any mask is built, when matplotlib is missing
    block_mask = mask_mod_or_block_mask
    if not isinstance(block_mask, BlockMask) and type(block_mask).__name__ == "BlockMask" \
            and hasattr(block_mask, "kv_num_blocks"):
        block_mask = BlockMask.from_torch(block_mask)   # torch.nn.attention.flex_attention.BlockMask
    if isinstance(block_mask, BlockMask):
        for name, given, actual in (("seq_len", seq_len, block_mask.seq_lengths[0]),
                                    ("kv_len", kv_len, block_mask.seq_lengths[1])):
            if given is not None and int(given) != actual:
                raise ValueError(f"{name}={given} does not match the BlockMask's seq_lengths {block_mask.seq_lengths}")
        fig = _draw_tiles(block_mask, title)
    else:
        mod = as_mask_mod(mask_mod_or_block_mask)
        if seq_len is None:
            raise ValueError("plot(mask_mod, seq_len=...): a mask_mod needs the query length to draw")
        kv_len = seq_len if kv_len is None else kv_len
        if min(seq_len, kv_len) < 1:
            raise ValueError(f"seq_len and kv_len must be positive, got {seq_len} and {kv_len}")
        if seq_len <= max_pixels and kv_len <= max_pixels:
            fig = _draw_elements(mod, int(seq_len), int(kv_len), title)
        else:
            block_mask = create_block_mask(mod, 1, 1, int(seq_len), int(kv_len), device="cpu",
                                           BLOCK_SIZE=block_size)
            fig = _draw_tiles(block_mask, title)
    if path is not None:
        # PNG, unless the file name asks for another format matplotlib writes (.svg, .pdf, ...)
        suffix = os.path.splitext(os.fspath(path))[1][1:].lower() if isinstance(path, (str, os.PathLike)) else ""
        fig.savefig(path, format=suffix if suffix in fig.canvas.get_supported_filetypes() else "png")
    return fig
