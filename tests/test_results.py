"""The committed results regenerate from the files kept beside them: the synth run's protocol analysis
and its sweep report (the numbers its README and statement cite)."""
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SYNTH = REPO / "results" / "synth"


def test_the_synth_analysis_regenerates_from_the_kept_files():
    out = subprocess.run([sys.executable, str(SYNTH / "analyze.py"), "--exp-dir", str(SYNTH)], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    kept = (SYNTH / "analysis" / "analysis.md").read_text()
    # the first line names the commit and folder it ran at
    assert out.split("\n", 1)[1] == kept.split("\n", 1)[1]


def test_the_synth_report_regenerates_byte_for_byte(tmp_path):
    for sub in ["metadata", "traces", "models"]:
        shutil.copytree(SYNTH / sub, tmp_path / sub)
    subprocess.run([sys.executable, "report.py", "--exp-dir", str(tmp_path), "--metric", "raw"], cwd=REPO,
                   capture_output=True, text=True, check=True)
    assert (tmp_path / "report.md").read_text() == (SYNTH / "report.md").read_text()
