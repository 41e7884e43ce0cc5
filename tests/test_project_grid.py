"""bench/project_grid.py: a stage's decode time read back from its progress line, the projection's
formula, and the committed real-shape run projected for the paper grid."""
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import project_grid  # noqa: E402

RUN = REPO / "results" / "shapes" / "run_5c5adca"


def progress_log(latency, rate, tokens, every=3072):
    """A gentraces stage log as tqdm writes it: a progress update every `every` tokens, the first after
    `latency` seconds (compilation, the first prefill), then at a steady `rate` tokens/s."""
    parts, done = ["traces (rank 0):   0%|          | 0/384 [00:00<?, ?row/s]"], 0
    while done < tokens:
        done = min(done + every, tokens)
        t = latency + (done - every) / rate if done > every else latency
        shown = f"{int(t) // 60:02d}:{int(t) % 60:02d}"
        parts.append(f"traces (rank 0):   0%|          | 0/384 [{shown}<?, ?row/s, {done / t:,.0f} tok/s]")
    return "\r".join(parts) + "\n"


@pytest.mark.parametrize("latency,rate,tokens", [(25.6, 9500.0, 360_597), (14.2, 22_000.0, 181_084),
                                                  (61.0, 3000.0, 120_000)])
def test_decode_seconds_leaves_the_first_updates_latency_out(latency, rate, tokens):
    work, first = project_grid.decode_seconds(progress_log(latency, rate, tokens), tokens)
    assert work == pytest.approx(tokens / rate, rel=0.03)
    assert first == pytest.approx(latency, abs=1.0)


def test_a_log_without_token_rates_is_refused():
    with pytest.raises(ValueError, match="progress updates"):
        project_grid.decode_seconds("traces (rank 0):   0%|  | 0/8 [00:00<?, ?row/s]\n", 100)


def stage(**kw):
    return dict(dict(label="s", per="once", split="test", n=128, work=10.0, wall=40.0, gen="plain", first=5.0,
                     peak=None), **kw)


def test_at_the_measured_count_on_one_process_a_stage_takes_its_measured_wall_time():
    stages = [stage(), stage(per="ads", split="train", n=384, work=30.0, wall=100.0, gen="ads")]
    out, total = project_grid.project(stages, {"ads": 1}, 1, {"test": 128, "train": 384})
    assert [s["each"] for s in out] == pytest.approx([40.0, 100.0])
    assert total == pytest.approx(140.0)


def test_work_scales_with_the_count_over_the_processes_and_overhead_does_not():
    out, total = project_grid.project([stage(per="ads", gen="ads")], {"ads": 3}, 8, {"test": 1280})
    assert out[0]["each"] == pytest.approx(30.0 + 10.0 * 10 / 8)
    assert total == pytest.approx(3 * out[0]["each"])


def test_the_reference_slows_generation_by_its_ratio_and_compiles_nothing():
    stages = [stage(gen="ads"), stage(gen=None, first=None)]
    out, _ = project_grid.project(stages, {}, 1, {"test": 128}, {"ads": 8.0, "plain": 2.0})
    assert out[0]["each"] == pytest.approx(40.0 - 10.0 - 5.0 + 80.0)
    assert out[1]["each"] == pytest.approx(40.0)  # distillation and the gradient are the same code


def test_the_committed_rehearsal_projects_the_paper_grid(tmp_path):
    out = tmp_path / "projection.md"
    project_grid.main(["--run", str(RUN), "--out", str(out),
                       "--bench", str(REPO / "bench/results/h200_engine_vs_reference_b192_0e2b447.json")])
    text = out.read_text()
    assert "59 rows: 38 ads, 21 temperature" in text and "8 GPUs" in text
    stages = project_grid.measured_stages(RUN)
    assert len(stages) == 5 + 2 * 4  # holdout, gradient, three references; four stages per row
    ours = project_grid.project(stages, {"ads": 38, "temperature": 21}, 8, project_grid.PAPER_COUNTS)[1]
    ratios = project_grid.bench_ratios(REPO / "bench/results/h200_engine_vs_reference_b192_0e2b447.json")
    reference = project_grid.project(stages, {"ads": 38, "temperature": 21}, 8, project_grid.PAPER_COUNTS, ratios)[1]
    assert 0 < ours < reference
    assert f"{ours / 3600:.1f} h with this repository" in text


def write_stage3(run: Path, row: str, engine: str, rate: float, tokens: int = 24_576):
    (run / "logs").mkdir(parents=True, exist_ok=True)
    (run / "traces").mkdir(parents=True, exist_ok=True)
    (run / "logs" / f"stage3_{row}_{engine}.log").write_text(progress_log(20.0, rate, tokens))
    (run / "traces" / f"stage3_{row}_{engine}.yaml").write_text(f"stats:\n  generated_tokens: {tokens}\n")


def test_stage3_ratios_are_the_engines_decode_rate_over_the_reference_loops_per_row(tmp_path):
    assert project_grid.stage3_ratios(tmp_path) is None
    write_stage3(tmp_path, "ads", "auto", 9000.0)
    write_stage3(tmp_path, "ads", "reference", 1000.0)
    assert project_grid.stage3_ratios(tmp_path) == {"ads": pytest.approx(9.0, rel=0.03), "plain": 1.0}
    write_stage3(tmp_path, "temperature", "auto", 20_000.0)
    write_stage3(tmp_path, "temperature", "reference", 8000.0)
    assert project_grid.stage3_ratios(tmp_path) == {"ads": pytest.approx(9.0, rel=0.03),
                                                    "plain": pytest.approx(2.5, rel=0.03)}


def test_the_committed_stage3_run_gives_the_projections_same_run_ratios(tmp_path):
    """results/shapes/run_1c9c5f9: both rows' stage 3 through the engine and the reference loop; the
    projection of the full run with those ratios is the committed one."""
    stage3 = REPO / "results" / "shapes" / "run_1c9c5f9"
    ratios = project_grid.stage3_ratios(stage3)
    assert ratios["ads"] > ratios["plain"] > 1.0
    out = tmp_path / "projection.md"
    project_grid.main(["--run", str(RUN), "--stage3", str(stage3), "--out", str(out),
                       "--bench", *sorted(str(p) for p in (REPO / "bench" / "results").glob("h200_engine_vs_reference_b192_*.json"))])
    assert out.read_text().replace(str(REPO) + "/", "") == (stage3 / "projection.md").read_text()
    assert f"| `{stage3}: stage 3, engine vs reference loop` | {ratios['ads']:.2f}x | {ratios['plain']:.2f}x" \
        in out.read_text()
