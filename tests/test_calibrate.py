"""calibrate.py: the bisection finds the parameter whose accuracy meets a target, and the grid file it
writes is what pipeline.sh runs (the run itself is in test_pipeline_synth.py)."""
import math
from types import SimpleNamespace

import calibrate


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
    assert lines == ["1.25e+00 0 0", "9.00e-01 3.00e-02 1.00e-03", "9.00e-01 1.20e-01 1.00e-03",
                     "9.00e-01 3.00e-02 1.00e-03 permute", "9.00e-01 0 0"]
