import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features import geohash


def test_known_encodings():
    assert geohash.encode(57.64911, 10.40744, 11)[0] == "u4pruydqqvj"  # the classic example
    assert geohash.encode(31.2304, 121.4737, 6)[0] == "wtw3sj"  # Shanghai, People's Square
    assert geohash.encode(-90, -180, 5)[0] == "00000"
    assert geohash.encode(90, 180, 5)[0] == "zzzzz"


def test_known_neighbours():
    # n, ne, e, se, s, sw, w, nw of a documented example cell
    assert geohash.neighbours(["gbsuv"])[0].tolist() == ["gbsvj", "gbsvn", "gbsuy", "gbsuw", "gbsut", "gbsus", "gbsuu", "gbsvh"]


def test_decode_is_inside_the_cell_and_reencodes():
    lat, lon = geohash.decode(["wtw3sjq6q5y8"])
    assert abs(lat[0] - 31.23) < 0.01 and abs(lon[0] - 121.47) < 0.01
    assert geohash.encode(lat, lon, 12)[0] == "wtw3sjq6q5y8"


def test_antimeridian_wraps_and_poles_have_no_outer_neighbour():
    east_edge = geohash.encode(0.0, 179.99, 4)[0]
    n = geohash.neighbours([east_edge])[0]
    _, lon_east = geohash.decode([n[2]])
    assert lon_east[0] < -179  # the eastern neighbour is across the antimeridian
    top = geohash.encode(89.99, 0.0, 4)[0]
    assert geohash.neighbours([top])[0][0] == ""


def test_invalid_input_is_refused():
    with pytest.raises(ValueError):
        geohash.encode(91.0, 0.0, 6)
    with pytest.raises(ValueError):
        geohash.decode(["abc!"])  # 'a' and '!' are not geohash characters
    with pytest.raises(ValueError):
        geohash.encode(0.0, 0.0, 13)
    with pytest.raises(ValueError):
        geohash.code_of("wtw3sa")  # 'a' is not a geohash character


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=geohash.BASE32 + geohash.BASE32.upper(), min_size=1, max_size=12))
def test_the_scalar_code_of_one_geohash_is_the_vectorised_one(cell):
    assert geohash.code_of(cell) == int(geohash.to_codes(np.array([cell]))[0][0])


@settings(max_examples=200, deadline=None)
@given(lat=st.floats(-90, 90), lon=st.floats(-180, 180), precision=st.integers(1, 12))
def test_the_scalar_neighbours_of_one_cell_are_the_vectorised_ones(lat, lon, precision):
    code = geohash.to_codes(geohash.encode(lat, lon, precision))[0]  # poles and the antimeridian included
    assert geohash.neighbour_codes_of(int(code[0]), precision) == geohash.neighbour_codes(code, precision)[0].tolist()


@settings(max_examples=200, deadline=None)
@given(lat=st.floats(-78, 78), lon=st.floats(-179.9, 179.9), precision=st.integers(2, 12))
def test_neighbours_are_adjacent_cells(lat, lon, precision):
    cell = geohash.encode(lat, lon, precision)
    ring = geohash.neighbours(cell)[0]
    assert len(set(ring)) == 8 and cell[0] not in ring
    h, w = geohash.cell_size_m(precision, 0.0)
    clat, clon = geohash.decode(cell)
    nlat, nlon = geohash.decode(ring)
    # each neighbour centre is exactly one cell step away in latitude and/or longitude
    dlat_steps = np.round((nlat - clat[0]) / (h / geohash.EARTH_RADIUS_M * 180 / np.pi), 6)
    dlon = (nlon - clon[0] + 180) % 360 - 180
    dlon_steps = np.round(dlon / (w / geohash.EARTH_RADIUS_M * 180 / np.pi), 6)
    steps = set(zip(dlon_steps.tolist(), dlat_steps.tolist()))
    assert steps == {tuple(map(float, o)) for o in geohash.NEIGHBOUR_OFFSETS}
    # adjacency is symmetric
    for n in ring:
        assert cell[0] in geohash.neighbours([n])[0]


@settings(max_examples=200, deadline=None)
@given(lat=st.floats(-90, 90), lon=st.floats(-180, 180), precision=st.integers(1, 12))
def test_point_lies_in_its_cell(lat, lon, precision):
    cell = geohash.encode(lat, lon, precision)
    clat, clon = geohash.decode(cell)
    h, w = geohash.cell_size_m(precision, 0.0)
    half_lat = h / geohash.EARTH_RADIUS_M * 180 / np.pi / 2
    half_lon = w / geohash.EARTH_RADIUS_M * 180 / np.pi / 2
    # a point on a cell edge may round into either cell: allow 1e-9 degrees (0.1 mm)
    assert abs(clat[0] - lat) <= half_lat + 1e-9 and abs(clon[0] - lon) <= half_lon + 1e-9
    assert geohash.encode(lat, lon, precision + 1 if precision < 12 else 12)[0].startswith(cell[0])
