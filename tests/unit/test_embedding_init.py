"""Deterministic initialization: a row's initial values depend only on (initializer, seed, id)."""

from __future__ import annotations

import numpy as np
import pytest

import paramserver as ps
from tests.unit.embedding_helpers import EDGE_IDS, initial_rows, make_table

INITS = [ps.init.zeros(), ps.init.uniform(-0.5, 0.25), ps.init.normal(0.1, 0.02)]


def _bits(a: np.ndarray) -> list[str]:
    return [hex(int(x)) for x in np.asarray(a, np.float32).view(np.uint32).ravel()]


def test_golden_values_are_stable() -> None:
    """Bit patterns fixed for good: every server, version and platform must produce these."""
    ids = np.array([0, 2**64 - 1], dtype=np.uint64)
    assert _bits(initial_rows(ps.init.normal(0.0, 1.0), 42, ids, 5)) == [
        "0xbf0788a4", "0x3ef94ed2", "0xbf2b9326", "0xbefebb55", "0x40166844",
        "0x3fddee43", "0x3f7d104d", "0xbf4346f5", "0x3f0d2717", "0x3f3c0754"]
    assert _bits(initial_rows(ps.init.uniform(-1.0, 1.0), 42, ids, 5)) == [
        "0x3f0b4afd", "0xbe7260d7", "0x3ed2c955", "0x3e5024ce", "0xbf76e074",
        "0xbf3a213a", "0xbf55c67a", "0x3e918e5d", "0xbe4c01d3", "0xbf379b4d"]


def _mix64(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def test_generator_is_the_documented_box_muller() -> None:
    """The core's own log/sin/cos agree with libm to float32 rounding."""
    gamma = np.uint64(0x9E3779B97F4A7C15)
    seed, n, dim = 9, 2000, 8
    ids = np.arange(n, dtype=np.uint64) * np.uint64(0x1234567) + np.uint64(2**63)
    with np.errstate(over="ignore"):
        key = _mix64(_mix64(np.uint64(seed) + gamma) ^ ids)[:, None]
        k = np.arange(dim, dtype=np.uint64)[None, :]
        draws = _mix64(key + (k + np.uint64(1)) * gamma)
    u = (draws >> np.uint64(11)).astype(np.float64) * 2.0**-53
    u1 = ((draws[:, 0::2] >> np.uint64(11)) + np.uint64(1)).astype(np.float64) * 2.0**-53
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = 2 * np.pi * u[:, 1::2]
    want_normal = np.empty((n, dim))
    want_normal[:, 0::2] = radius * np.cos(angle)
    want_normal[:, 1::2] = radius * np.sin(angle)
    got = initial_rows(ps.init.normal(0.0, 1.0), seed, ids, dim)
    np.testing.assert_allclose(got, want_normal.astype(np.float32), rtol=2e-7, atol=1e-7)
    got = initial_rows(ps.init.uniform(2.0, 3.0), seed, ids, dim)
    np.testing.assert_array_equal(got, (2.0 + u).astype(np.float32))


@pytest.mark.parametrize("init", INITS, ids=repr)
def test_same_seed_and_id_give_same_row_everywhere(init: ps.init.Initializer) -> None:
    ids = np.concatenate([EDGE_IDS, np.arange(100, 400, dtype=np.uint64)])
    a = make_table(16, ps.Adagrad(), init, seed=5)
    b = make_table(16, ps.Adam(), init, seed=5, num_stripes=4)
    first = a.pull(ids)
    shuffled = np.random.default_rng(0).permutation(len(ids))
    np.testing.assert_array_equal(b.pull(ids[shuffled]), first[shuffled])
    # A push creates the same row as a pull; a table restored from an export has the same rows.
    c = make_table(16, ps.SGD(lr=0.0), init, seed=5)
    c.push(ids[::-1].copy(), np.zeros((len(ids), 16), np.float32))
    np.testing.assert_array_equal(c.pull(ids), first)
    d = make_table(16, ps.Adagrad(), init, seed=5)
    d.import_rows(*a.export_rows())
    np.testing.assert_array_equal(d.pull(ids), first)
    np.testing.assert_array_equal(initial_rows(init, 5, ids, 16), first)
    # After clear() rows are recreated identically.
    a.clear()
    np.testing.assert_array_equal(a.pull(ids), first)


@pytest.mark.parametrize("init", INITS[1:], ids=repr)
def test_different_seeds_and_ids_differ(init: ps.init.Initializer) -> None:
    ids = np.arange(50, dtype=np.uint64)
    r0, r1 = initial_rows(init, 0, ids, 8), initial_rows(init, 1, ids, 8)
    assert np.mean(r0 != r1) > 0.99
    assert len({row.tobytes() for row in r0}) == len(ids)


def test_row_values_do_not_depend_on_width() -> None:
    ids = np.array([3, 2**64 - 1], dtype=np.uint64)
    for init in INITS:
        wide = initial_rows(init, 7, ids, 17)
        np.testing.assert_array_equal(initial_rows(init, 7, ids, 5), wide[:, :5])


def test_statistics() -> None:
    normal = ps.init.normal(0.5, 2.0)((1000, 100), seed=3)
    assert abs(normal.mean() - 0.5) < 0.03 and abs(normal.std() - 2.0) < 0.03
    z = (normal - 0.5) / 2.0
    assert abs(np.mean(np.abs(z) < 1.0) - 0.6827) < 0.01
    assert abs(np.mean(z ** 4) - 3.0) < 0.1  # kurtosis of a normal
    uniform = ps.init.uniform(-1.0, 3.0)((1000, 100), seed=3)
    assert uniform.min() >= -1.0 and uniform.max() <= 3.0
    assert abs(uniform.mean() - 1.0) < 0.02 and abs(uniform.var() - 16 / 12) < 0.03
    hist = np.histogram(uniform, bins=10, range=(-1, 3))[0]
    assert hist.min() > 9500 and hist.max() < 10500
    assert not ps.init.zeros()((10, 3)).any()


def test_callable_matches_table_rows_for_ids_0_to_n() -> None:
    init = ps.init.normal(0.0, 0.01)
    table = make_table(12, ps.SGD(), init, seed=77)
    want = table.pull(np.arange(6, dtype=np.int64))
    np.testing.assert_array_equal(init((6, 12), seed=77), want)
    np.testing.assert_array_equal(init((6, 3, 4), seed=77), want.reshape(6, 3, 4))
    assert init((6,), seed=77).shape == (6,) and init(6, seed=77).dtype == np.float32
    assert init((), seed=77).shape == ()
    assert init((0, 4)).shape == (0, 4)


def test_descriptions_validate_compare_and_round_trip() -> None:
    assert ps.init.normal(0.0, 0.01) == ps.init.Normal(mean=0.0, std=0.01)
    assert ps.init.normal() != ps.init.normal(0.0, 0.02)
    assert ps.init.uniform() != ps.init.normal()
    assert len({ps.init.zeros(), ps.init.zeros(), ps.init.uniform()}) == 2
    for init in (ps.init.zeros(), ps.init.uniform(-2, 1), ps.init.normal(1, 3)):
        assert ps.init.initializer_from_dict(init.to_dict()) == init
    assert ps.init.normal(0.0, 0.01).to_dict() == {"name": "normal", "mean": 0.0, "std": 0.01}
    assert repr(ps.init.uniform()) == "uniform(a=-0.05, b=0.05)"
    with pytest.raises(AttributeError):
        ps.init.normal().std = 1.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="std"):
        ps.init.normal(0.0, -1.0)
    with pytest.raises(ValueError, match="a <= b"):
        ps.init.uniform(1.0, 0.0)
    with pytest.raises(ValueError, match="finite"):
        ps.init.normal(float("nan"))
    with pytest.raises(TypeError):
        ps.init.uniform("0", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown initializer"):
        ps.init.initializer_from_dict({"name": "xavier"})
    with pytest.raises(ValueError, match="bad normal"):
        ps.init.initializer_from_dict({"name": "normal", "sigma": 1.0})
    with pytest.raises(ValueError, match="seed"):
        ps.init.normal()((2, 2), seed=-1)
    with pytest.raises(ValueError, match="shape"):
        ps.init.normal()((2, -2))
