"""calibrate.py: the bisection finds the parameter whose accuracy meets a target, and the grid file it
writes is what pipeline.sh runs (the run itself is in test_pipeline_synth.py)."""
import math
from types import SimpleNamespace

import pytest

import calibrate
import grid


def test_bisection_finds_the_parameter_of_the_target_accuracy_in_linear_and_log_space():
    falling = lambda x: 1 / (1 + math.exp(4 * (x - 1.7)))  # accuracy falls with the temperature
    x, acc = calibrate.search(None, falling, 0.5, 4.0, 0.8, 0.005, 20, geometric=False)
    assert abs(acc - 0.8) <= 0.005 and 1.2 < x < 1.5
    log_falling = lambda lam: 1 / (1 + (lam / 3.0) ** 2)  # over decades of lam
    lam, acc = calibrate.search(None, log_falling, 1e-3, 1e3, 0.9, 0.005, 40, geometric=True)
    assert abs(acc - 0.9) <= 0.005 and 0.9 < lam < 1.1


def test_search_returns_the_closest_probe_when_it_runs_out():
    probes = []
    f = lambda x: probes.append(x) or (0.95 if x < 1.0 else 0.1)  # a cliff: no probe lands near 0.8
    x, acc = calibrate.search(None, f, 0.5, 2.0, 0.8, 0.01, 4, geometric=False)
    assert len(probes) == 4 and acc == 0.95 and x < 1.0


def test_grid_file_has_each_band_the_permuted_row_and_the_reference_once():
    args = SimpleNamespace(targets=[0.9, 0.8], ads_tau=0.9, permute=True, reference=True)
    temperature = {0.9: (1.25, 0.9), 0.8: (1.25, 0.82)}  # both bands landed on one tau: one row
    ads = {0.9: (0.03, 0.9), 0.8: (0.12, 0.8)}
    lines = calibrate.grid_lines(args, temperature, ads, 1e-3)
    assert lines == ["1.25e+00 0.00e+00 0.00e+00", "9.00e-01 3.00e-02 1.00e-03", "9.00e-01 1.20e-01 1.00e-03",
                     "9.00e-01 3.00e-02 1.00e-03 permute", "9.00e-01 0.00e+00 0.00e+00"]
    assert [grid.parse_row(line).kind for line in lines] == ["temperature", "ads", "ads", "control", "temperature"]


def plain_sampling(tau, lam=0.0, eps=0.0):
    """A teacher whose plain sampling is 97% accurate near greedy and falls with tau (about 0.89 at tau 0.9)."""
    return 0.97 / (1 + math.exp(6 * (tau - 1.3))) + 0.0 * lam, {}


def ads_args(**kw):
    base = dict(targets=[0.9, 0.8], ads_tau="auto", headroom=0.03, tolerance=0.005, probes=20)
    return SimpleNamespace(**{**base, **kw})


def test_auto_ads_tau_is_where_plain_sampling_is_headroom_above_the_highest_target():
    tau, acc = calibrate.choose_ads_tau(lambda name, tau, *a: plain_sampling(tau), ads_args())
    assert abs(acc - 0.93) <= 0.005 and tau < 0.9


def test_an_ads_tau_whose_plain_sampling_is_below_a_target_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        calibrate.choose_ads_tau(lambda name, tau, *a: plain_sampling(tau), ads_args(ads_tau=0.9))
    message = str(stop.value)
    assert message.startswith("error: calibrate.py: ADS target 0.90") and "0.88" in message and "\n" not in message
    tau, acc = calibrate.choose_ads_tau(lambda name, tau, *a: plain_sampling(tau), ads_args(ads_tau=0.5))
    assert tau == 0.5 and acc > 0.93
