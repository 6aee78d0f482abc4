"""Checks shared by the Triton kernels' frozen launch configs."""

from __future__ import annotations


def check_tiles(config, tile_names: tuple[str, ...]) -> None:
    """ValueError unless each named tile is a power of two >= 16, num_warps a power of two <= 16
    and num_stages >= 1 (`config` has those fields)."""
    for name in tile_names:
        value = getattr(config, name)
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= 16; got {value}")
    if config.num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"num_warps must be one of 1, 2, 4, 8, 16; got {config.num_warps}")
    if config.num_stages < 1:
        raise ValueError(f"num_stages must be >= 1; got {config.num_stages}")
