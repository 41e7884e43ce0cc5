import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import grid

ROOT = Path(__file__).resolve().parents[1]
FIELD = re.compile(r"^-?\d\.\d\de[+-]\d\d$")


def run_grid(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "grid.py"), *args], capture_output=True, text=True, cwd=ROOT)


def cli_rows(*args: str) -> list[str]:
    out = run_grid(*args)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_paper_grid_has_40_ads_rows_and_19_temperature_rows():
    rows = grid.grid_rows("paper")
    assert len(rows) == 59
    ads = [r for r in rows if r[0] <= 1.0]
    temperature = [r for r in rows if r[0] > 1.0]
    assert len(ads) == 40 and all(r.eps == 1e-2 for r in ads)
    assert len(temperature) == 19 and all(r.lam == r.eps == 0.0 for r in temperature)
    assert all(r.control == "none" for r in rows)
    assert len(set(rows)) == 59


def test_cli_prints_each_rows_name_kind_and_2e_fields_and_no_empty_line():
    out = run_grid()
    assert out.returncode == 0, out.stderr
    assert out.stdout.endswith("\n") and not out.stdout.endswith("\n\n")
    lines = out.stdout.splitlines()
    assert len(lines) == 59
    for line in lines:
        name, kind, *values, control = line.split(" ")
        assert len(values) == 3 and all(FIELD.match(f) for f in values), line
        row = grid.parse_row(" ".join(values + [control]))
        assert (name, kind) == (row.name, row.kind)
    assert "tau1.50e+00_lam0.00e+00_eps0.00e+00 temperature 1.50e+00 0.00e+00 0.00e+00 none" in cli_rows("--grid", "tiny")


def test_spec_output_is_the_grid_file_format_and_reads_back_as_the_same_rows(tmp_path):
    path = tmp_path / "grid.txt"
    path.write_text("\n".join(cli_rows("--grid", "synth", "--spec")) + "\n")
    assert grid.read_rows(path) == [grid.parse_row(r.spec) for r in grid.grid_rows("synth")]
    assert cli_rows("--grid", str(path)) == cli_rows("--grid", "synth")


@pytest.mark.parametrize("num_shards", [1, 2, 3, 8])
def test_shards_partition_the_grid(num_shards):
    everything = cli_rows()
    shards = [cli_rows("--shard", str(i), "--num-shards", str(num_shards)) for i in range(num_shards)]
    assert sorted(line for shard in shards for line in shard) == sorted(everything)
    for i in range(num_shards):
        for j in range(i + 1, num_shards):
            assert not set(shards[i]) & set(shards[j])


@pytest.mark.parametrize("shard,num_shards", [(3, 3), (-1, 2), (0, 0)])
def test_shard_outside_range_is_a_one_line_error(shard, num_shards):
    out = run_grid("--shard", str(shard), "--num-shards", str(num_shards))
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.splitlines()) == 1
    assert re.fullmatch(r"error: --(shard|num-shards) must be.*", out.stderr.splitlines()[-1])


def test_paper_grid_is_shuffled_yet_deterministic():
    rows = grid.grid_rows("paper")
    assert rows != sorted(rows) and rows != sorted(rows, reverse=True)
    assert rows == grid.grid_rows("paper")
    assert cli_rows() == cli_rows()


def test_tiny_grid_has_a_temperature_row_an_ads_row_and_its_control():
    rows = grid.grid_rows("tiny")
    assert sum(r.lam == r.eps == 0.0 for r in rows) >= 1
    assert sum(r.lam > 0 and r.eps > 0 and r.control == "none" for r in rows) >= 1
    assert sum(r.control == "permute" for r in rows) >= 1


def test_a_row_knows_its_name_and_kind_and_records_its_printed_fields():
    assert grid.Row(0.9, 0.05, 1e-2).name == "tau9.00e-01_lam5.00e-02_eps1.00e-02"
    assert grid.Row(1.5, 0.0, 0.0).name == "tau1.50e+00_lam0.00e+00_eps0.00e+00"
    assert grid.Row(0.9, 0.05, 1e-2, "permute").name == "tau9.00e-01_lam5.00e-02_eps1.00e-02_permute"
    assert [grid.Row(*r).kind for r in [(1.5, 0, 0), (0.9, 0, 0.01), (0.9, 0.05, 0.01), (0.9, 0.05, 0.01, "permute")]] \
        == ["temperature", "temperature", "ads", "control"]
    assert grid.Row(1 / 3, 0.123456, 1e-2).fields() == {"name": "tau3.33e-01_lam1.23e-01_eps1.00e-02", "kind": "ads",
                                                       "tau": 0.333, "lam": 0.123, "eps": 0.01, "control": "none"}


@pytest.mark.parametrize("spec", ["0.9 0.1", "0.9 0.1 0.01 shuffle", "a 0.1 0.01", "1.5 0 0 permute", "0.9 0.1 0.01 none x"])
def test_a_malformed_row_spec_is_refused_with_what_was_expected(spec, tmp_path):
    with pytest.raises(ValueError, match="expected 'tau lam eps|acts on the ADS penalty"):
        grid.parse_row(spec)
    path = tmp_path / "grid.txt"
    path.write_text("0.9 0.1 0.01\n" + spec + "\n")
    out = run_grid("--grid", str(path))
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith(f"error: {path}:2: ") and len(out.stderr.splitlines()) == 1


def test_synth_grid_pairs_every_ads_row_with_a_permuted_control():
    rows = grid.grid_rows("synth")
    temperature = [r for r in rows if r.lam == 0]
    ads = {r[:3] for r in rows if r.lam > 0 and r.control == "none"}
    control = {r[:3] for r in rows if r.control == "permute"}
    assert len(temperature) >= 6 and len(ads) >= 6 and ads == control and len(rows) == len(set(rows))
    lines = cli_rows("--grid", "synth", "--spec")
    assert len(lines) == len(rows)
    assert sorted(len(line.split(" ")) for line in lines) == [3] * (len(rows) - len(control)) + [4] * len(control)
    assert all(line.split(" ")[3] == "permute" for line in lines if line.count(" ") == 3)


@pytest.mark.parametrize("env,message", [({"GRID": "nope"}, "a file of rows, got 'nope'"),
                                         ({"PARALLEL": "0"}, "PARALLEL must be a positive integer"),
                                         ({"ROW_GPUS": "0,,1"}, "ROW_GPUS must be comma-separated GPU indices")])
def test_pipeline_refuses_a_bad_grid_parallel_or_row_gpus_before_any_stage(env, message, tmp_path):
    exp = tmp_path / "exp"
    bin_dir = str(Path(sys.executable).parent)  # the drivers call `python`: this interpreter's
    res = subprocess.run(["bash", str(ROOT / "pipeline.sh")], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"],
                              "EXP_DIR": str(exp), **env})
    assert res.returncode == 2 and message in res.stderr.splitlines()[-1]
    assert not exp.exists()


@pytest.mark.slow  # runs pipeline.sh into its first stage
@pytest.mark.parametrize("launcher", ["python", "python -u", f"{sys.executable} -u"])
def test_a_python_launcher_runs_the_stage_itself_with_no_rendezvous_port(launcher, tmp_path):
    (tmp_path / "no_teacher").mkdir()  # it exists, so the settings check passes, but holds no model
    bin_dir = str(Path(sys.executable).parent)
    res = subprocess.run(["bash", str(ROOT / "pipeline.sh")], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"],
                              "EXP_DIR": str(tmp_path / "exp"), "LAUNCH": launcher, "GRID": "tiny",
                              "TEACHER": str(tmp_path / "no_teacher"), "HF_HUB_OFFLINE": "1"})
    # the first stage reaches gentraces.py and fails there, on the missing teacher, in one line
    assert res.returncode != 0 and "== " in res.stderr and "holdout traces" in res.stderr
    assert "main_process_port" not in res.stderr and "no_teacher" in res.stderr.splitlines()[-1]


@pytest.mark.slow  # runs pipeline.sh into its first stage
def test_a_failed_first_phase_stops_the_pipeline_before_any_row_needs_the_gradient(tmp_path):
    (tmp_path / "no_teacher").mkdir()  # it exists, so the settings check passes, but holds no model
    bin_dir = str(Path(sys.executable).parent)
    res = subprocess.run(["bash", str(ROOT / "pipeline.sh")], capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env={**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"],
                              "EXP_DIR": str(tmp_path / "exp"), "LAUNCH": "python", "GRID": "tiny", "PARALLEL": "3",
                              "TEACHER": str(tmp_path / "no_teacher"), "HF_HUB_OFFLINE": "1"})
    out = res.stdout + res.stderr  # the prefixed jobs write to stdout
    # phase 1 (holdout, references, the temperature row's traces) fails on the missing teacher, in
    # its jobs' own lines; the ADS rows, which need the gradient, never start
    started = [line for line in out.splitlines() if "== " in line]
    assert res.returncode == 2 and started
    assert all(line.startswith(("[prepare] ", "[references] ", "[rows ")) for line in started)
    assert not any("lam2.00e-01" in line for line in started)
    assert "[prepare] == " in out and "holdout traces" in out
    assert res.stderr.splitlines()[-1].startswith("pipeline: a stage failed")
