"""Geohash encoding, decoding and neighbour cells, vectorised over numpy arrays.

A geohash of precision p interleaves 5p bits, longitude first: ceil(5p/2) longitude bits and
floor(5p/2) latitude bits, each the binary expansion of the coordinate within its range. Working on
the integer cell coordinates (not on strings) makes neighbours exact: a neighbour is the cell whose
integer longitude/latitude differs by one, with longitude wrapping around the antimeridian.
"""

from __future__ import annotations

import math

import numpy as np

BASE32 = "0123456789bcdefghjkmnpqrstuvwxyz"
_BASE32_BYTES = np.frombuffer(BASE32.encode(), dtype=np.uint8)
_DECODE = np.full(256, 255, dtype=np.uint8)
_DECODE[_BASE32_BYTES] = np.arange(32, dtype=np.uint8)

EARTH_RADIUS_M = 6_371_000.0

# Offsets (dlon, dlat) of the 8 neighbours, clockwise from north.
NEIGHBOUR_OFFSETS: tuple[tuple[int, int], ...] = (
    (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1),
)


def _bit_split(precision: int) -> tuple[int, int]:
    if not 1 <= precision <= 12:
        raise ValueError(f"geohash precision must be in 1..12, got {precision}")
    bits = 5 * precision
    return (bits + 1) // 2, bits // 2


# The bit helpers below use only integer operators, so they work on numpy arrays and torch tensors alike.
# Spreading and gathering bits are the Morton-code steps: a fixed handful of shifts and masks (for up to
# 32 bits), whatever the precision, instead of one operation per bit (this runs on every served request).
_SPREAD_STEPS = ((16, 0x0000FFFF0000FFFF), (8, 0x00FF00FF00FF00FF), (4, 0x0F0F0F0F0F0F0F0F),
                 (2, 0x3333333333333333), (1, 0x5555555555555555))
_GATHER_STEPS = ((1, 0x3333333333333333), (2, 0x0F0F0F0F0F0F0F0F), (4, 0x00FF00FF00FF00FF),
                 (8, 0x0000FFFF0000FFFF), (16, 0x00000000FFFFFFFF))


def _spread(v, nbits: int):
    """Place bit i of v (i < nbits <= 32) at position 2*i of a 2*nbits-bit word."""
    out = v & ((1 << nbits) - 1)
    for shift, mask in _SPREAD_STEPS:
        out = (out | (out << shift)) & mask
    return out


def _gather(code, nbits: int, offset: int):
    """The inverse of `_spread`: bit 2*i + offset of code to position i, for i < nbits."""
    out = (code >> offset) & 0x5555555555555555
    for shift, mask in _GATHER_STEPS:
        out = (out | (out >> shift)) & mask
    return out & ((1 << nbits) - 1)


def _cells_to_code(lon_cell, lat_cell, precision: int):
    lon_bits, lat_bits = _bit_split(precision)
    bits = lon_bits + lat_bits
    # Longitude bits sit at the odd positions counted from the least significant end when the total
    # bit count is odd (p odd), at even positions otherwise; align so the first bit is longitude.
    if bits % 2 == 0:
        return (_spread(lon_cell, lon_bits) << 1) | _spread(lat_cell, lat_bits)
    return _spread(lon_cell, lon_bits) | (_spread(lat_cell, lat_bits) << 1)


def _code_to_cells(code, precision: int):
    lon_bits, lat_bits = _bit_split(precision)
    if (lon_bits + lat_bits) % 2 == 0:
        return _gather(code, lon_bits, 1), _gather(code, lat_bits, 0)
    return _gather(code, lon_bits, 0), _gather(code, lat_bits, 1)


def _code_to_strings(code: np.ndarray, precision: int) -> np.ndarray:
    chars = np.empty((code.size, precision), dtype=np.uint8)
    for k in range(precision):
        shift = 5 * (precision - 1 - k)
        chars[:, k] = _BASE32_BYTES[(code >> shift) & 31]
    return chars.view(f"S{precision}").ravel().astype(f"U{precision}")


def to_codes(hashes: np.ndarray) -> tuple[np.ndarray, int]:
    """Integer codes (5 bits per character) of geohashes sharing one precision, and that precision."""
    return _strings_to_code(hashes)


_DIGITS = {c: i for i, c in enumerate(BASE32)}


def code_of(cell: str) -> int:
    """`to_codes` of one geohash, in plain Python: a served request has one, and numpy's string machinery
    costs ~70 us where this costs ~1 us. Raises ValueError on a character that is not base32."""
    code = 0
    for ch in cell.lower():  # as `to_codes`
        digit = _DIGITS.get(ch)
        if digit is None:
            raise ValueError(f"invalid geohash character {ch!r}")
        code = (code << 5) | digit
    return code


def _namespace(x):
    """numpy for arrays, torch for tensors (imported only when a tensor is passed)."""
    if isinstance(x, np.ndarray):
        return np
    import torch

    return torch


def neighbour_codes(code, precision: int):
    """Codes of the 8 neighbour cells, shape (..., 8), clockwise from north, for numpy arrays or torch
    tensors of codes. Longitude wraps around the antimeridian; a neighbour beyond a pole is -1."""
    xp = _namespace(code)
    lon_bits, lat_bits = _bit_split(precision)
    lon_cell, lat_cell = _code_to_cells(code, precision)
    dlon, dlat = (xp.asarray([o[k] for o in NEIGHBOUR_OFFSETS]) for k in (0, 1))
    if xp is not np:
        dlon, dlat = dlon.to(code.device), dlat.to(code.device)
    nlat = lat_cell[..., None] + dlat  # (..., 8)
    valid = (nlat >= 0) & (nlat < (1 << lat_bits))
    n = _cells_to_code((lon_cell[..., None] + dlon) % (1 << lon_bits), nlat.clip(0, (1 << lat_bits) - 1), precision)
    return xp.where(valid, n, -1)


def neighbour_codes_of(code: int, precision: int) -> list[int]:
    """`neighbour_codes` of one code, in plain Python: a served request has one cell, and the array version
    costs ~100 us of numpy calls on one value where this costs a few."""
    lon_bits, lat_bits = _bit_split(precision)
    lon_cell, lat_cell = _code_to_cells(code, precision)
    return [_cells_to_code((lon_cell + dlon) % (1 << lon_bits), lat_cell + dlat, precision)
            if 0 <= lat_cell + dlat < (1 << lat_bits) else -1 for dlon, dlat in NEIGHBOUR_OFFSETS]


def _strings_to_code(hashes: np.ndarray) -> tuple[np.ndarray, int]:
    arr = np.asarray(hashes, dtype=str)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64), 1
    precision = int(np.char.str_len(arr).max())
    if np.any(np.char.str_len(arr) != precision):
        raise ValueError("geohashes in one call must share a precision")
    raw = np.char.lower(arr).astype(f"S{precision}").view(np.uint8).reshape(-1, precision)
    digits = _DECODE[raw]
    if np.any(digits == 255):
        raise ValueError("invalid geohash character")
    code = np.zeros(arr.size, dtype=np.int64)
    for k in range(precision):
        code = (code << 5) | digits[:, k].astype(np.int64)
    return code, precision


def encode(lat: np.ndarray | float, lon: np.ndarray | float, precision: int = 12) -> np.ndarray:
    """Geohash strings of the given points (numpy array of str)."""
    lat = np.atleast_1d(np.asarray(lat, dtype=np.float64))
    lon = np.atleast_1d(np.asarray(lon, dtype=np.float64))
    if np.any(~np.isfinite(lat)) or np.any(np.abs(lat) > 90) or np.any(~np.isfinite(lon)) or np.any(np.abs(lon) > 180):
        raise ValueError("latitude must be in [-90, 90] and longitude in [-180, 180]")
    lon_bits, lat_bits = _bit_split(precision)
    lon_cell = np.minimum(((lon + 180.0) / 360.0 * (1 << lon_bits)).astype(np.int64), (1 << lon_bits) - 1)
    lat_cell = np.minimum(((lat + 90.0) / 180.0 * (1 << lat_bits)).astype(np.int64), (1 << lat_bits) - 1)
    return _code_to_strings(_cells_to_code(lon_cell, lat_cell, precision), precision)


def decode(hashes: np.ndarray | list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Centre (lat, lon) of each geohash cell."""
    code, precision = _strings_to_code(np.atleast_1d(hashes))
    lon_bits, lat_bits = _bit_split(precision)
    lon_cell, lat_cell = _code_to_cells(code, precision)
    lat = (lat_cell + 0.5) / (1 << lat_bits) * 180.0 - 90.0
    lon = (lon_cell + 0.5) / (1 << lon_bits) * 360.0 - 180.0
    return lat, lon


def cell_size_m(precision: int, lat: float = 0.0) -> tuple[float, float]:
    """(height, width) in metres of a cell of this precision at a latitude."""
    lon_bits, lat_bits = _bit_split(precision)
    height = math.radians(180.0 / (1 << lat_bits)) * EARTH_RADIUS_M
    width = math.radians(360.0 / (1 << lon_bits)) * EARTH_RADIUS_M * math.cos(math.radians(lat))
    return height, width


def neighbours(hashes: np.ndarray | list[str]) -> np.ndarray:
    """The 8 neighbour cells of each geohash, shape (n, 8), clockwise from north ("" beyond a pole)."""
    code, precision = _strings_to_code(np.atleast_1d(hashes))
    nbr = neighbour_codes(code, precision)
    strings = _code_to_strings(np.maximum(nbr, 0).ravel(), precision).reshape(nbr.shape)
    return np.where(nbr >= 0, strings, "")


def pattern(precision: int) -> str:
    """Regular expression matching a geohash of exactly this precision (used by the validator)."""
    _bit_split(precision)
    return f"^[{BASE32}]{{{precision}}}$"


def haversine_m(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Great-circle distance in metres (broadcasts)."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dp = p2 - p1
    dl = np.radians(np.asarray(lon2) - np.asarray(lon1))
    a = np.sin(dp / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * np.arcsin(np.sqrt(np.minimum(a, 1.0)))
