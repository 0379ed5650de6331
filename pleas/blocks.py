"""Grouped-convolution weights seen as dense block-diagonal matrices.

A convolution with G groups stores its weight as ``[C_out, C_in / G, k...]``: the rows of output
block j read only the input channels of block j.  Permuting, matching and widening channels are
statements about the dense ``[C_out, C_in, k...]`` matrix whose off-diagonal blocks are zero, so
that code works on the dense view and the result is stored compactly again.  A permutation that
moves blocks as wholes, with input and output blocks moving together (the spec ties them), keeps
the dense matrix block diagonal, and so does widening (merged, A-only and B-only blocks each
read their own input block); :func:`to_compact` checks that nothing is lost on the way back.
"""
from __future__ import annotations

import torch

from .spec import AxisRef, PermSpec


def to_dense(t: torch.Tensor, blocks: int) -> torch.Tensor:
    """``[R, c, ...]`` with ``blocks`` row blocks -> block-diagonal ``[R, blocks * c, ...]``."""
    rows, c, rest = t.shape[0], t.shape[1], tuple(t.shape[2:])
    if rows % blocks:
        raise ValueError(f"{rows} rows do not split into {blocks} blocks")
    r = rows // blocks
    out = t.new_zeros((blocks, r, blocks, c) + rest)
    idx = torch.arange(blocks, device=t.device)
    out[idx, :, idx] = t.reshape((blocks, r, c) + rest)
    return out.reshape((rows, blocks * c) + rest)


def to_compact(t: torch.Tensor, block_cols: int, what: str = "weight") -> torch.Tensor:
    """Block-diagonal ``[R, B * c, ...]`` -> its diagonal blocks ``[R, c, ...]``.

    Raises if anything lies off the diagonal blocks (a permutation that split a group).
    """
    rows, cols, rest = t.shape[0], t.shape[1], tuple(t.shape[2:])
    if cols % block_cols or rows % (cols // block_cols):
        raise ValueError(f"{what}: a {rows} x {cols} matrix has no blocks of {block_cols} columns")
    blocks = cols // block_cols
    view = t.reshape((blocks, rows // blocks, blocks, block_cols) + rest)
    idx = torch.arange(blocks, device=t.device)
    diag = view[idx, :, idx]
    off = view.clone()
    off[idx, :, idx] = 0
    if bool(off.ne(0).any()):
        raise ValueError(f"{what}: channels were moved across convolution groups (the weight is "
                         "no longer block diagonal); permute grouped channels in whole blocks")
    return diag.reshape((rows, block_cols) + rest)


def blocked_axes(spec: PermSpec) -> dict[str, AxisRef]:
    """State-dict keys stored block-diagonally (grouped convolution weights), with their axis."""
    return {ax.key: ax for g in spec.groups for ax in g.axes if ax.blocks > 1}


def dense_state(state: dict[str, torch.Tensor], spec: PermSpec) -> dict[str, torch.Tensor]:
    """``state`` with every grouped convolution weight in its dense block-diagonal form."""
    out = dict(state)
    for key, ax in blocked_axes(spec).items():
        if key in out and out[key].shape[ax.dim] != ax.size:
            out[key] = to_dense(out[key], ax.blocks)
    return out


def compact_state(state: dict[str, torch.Tensor], spec: PermSpec) -> dict[str, torch.Tensor]:
    """Inverse of :func:`dense_state`; the number of blocks may have changed (widening)."""
    out = dict(state)
    for key, ax in blocked_axes(spec).items():
        if key in out:
            out[key] = to_compact(out[key], ax.size // ax.blocks, key)
    return out
