"""t-spec grammar and SNR bands (docs/design.md §4); references are closed forms and explicit lists."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from geomprobe.errors import UsageError
from geomprobe.models import build_scheduler
from geomprobe.timesteps import format_timesteps, linear_alphas_cumprod, parse_timesteps, snr


def test_range_default_step():
    assert parse_timesteps("100..900").timesteps == (100, 200, 300, 400, 500, 600, 700, 800, 900)


def test_range_with_step_and_list():
    assert parse_timesteps("100..300:50").timesteps == (100, 150, 200, 250, 300)
    assert parse_timesteps("700, 100,300,100").timesteps == (100, 300, 700)
    assert parse_timesteps("5..5").timesteps == (5,)


def test_bands_match_design_boundaries():
    assert parse_timesteps("high-snr").timesteps == tuple(range(0, 259))
    assert parse_timesteps("mid-snr").timesteps == tuple(range(259, 674))
    assert parse_timesteps("low-snr").timesteps == tuple(range(674, 1000))
    assert parse_timesteps("all").timesteps == tuple(range(1000))
    assert parse_timesteps("LOW-SNR").band == "low-snr"


def test_alphas_cumprod_equals_diffusers():
    ours = linear_alphas_cumprod()
    theirs = build_scheduler().alphas_cumprod.double().numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)


def test_band_thresholds_are_on_snr():
    s = snr(linear_alphas_cumprod())
    low = np.array(parse_timesteps("low-snr").timesteps)
    assert (s[low] < 0.01).all() and (s[: low[0]] >= 0.01).all()
    custom = parse_timesteps("low-snr", low_threshold=0.1).timesteps
    assert custom[0] < low[0]


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "   ",
        "900..100",
        "100..900:0",
        "0..1000",
        "1000",
        "-5",
        "abc",
        "100..",
        "..900",
        "1,,2",
        "1.5",
        "100..900:-1",
        "medium-snr",
    ],
)
def test_bad_specs_raise_usage_error(spec):
    with pytest.raises(UsageError):
        parse_timesteps(spec)


def test_bad_thresholds():
    with pytest.raises(UsageError):
        parse_timesteps("low-snr", low_threshold=2.0, high_threshold=1.0)


@given(st.sets(st.integers(min_value=0, max_value=999), min_size=1, max_size=30))
def test_list_round_trip(ts):
    spec = format_timesteps(sorted(ts))
    assert parse_timesteps(spec).timesteps == tuple(sorted(ts))


@given(st.integers(0, 999), st.integers(0, 999), st.integers(1, 500))
def test_range_equals_python_range(a, b, step):
    if a > b:
        with pytest.raises(UsageError):
            parse_timesteps(f"{a}..{b}:{step}")
    else:
        assert parse_timesteps(f"{a}..{b}:{step}").timesteps == tuple(range(a, b + 1, step))
