"""pipeline_shapes.sh in its CPU form (STAGES=first on the shapes_narrow assets): the real vocabularies
(152,064 / 151,936 logits over a 151,665-id tokenizer, 128,256 for the Llama student) meet in the
holdout traces, the proxy gradient, an ADS row's train traces and the undistilled student's eval."""
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

import make_assets
import utils

REPO = Path(__file__).resolve().parents[1]
MAX_LENGTH = 160
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    exp = tmp_path_factory.mktemp("shapes") / "exp"
    env = {**os.environ, "EXP_DIR": str(exp), "ASSETS_PROFILE": "shapes_narrow", "LAUNCH": "python",
           "HOLDOUT_MAX_SAMPLES": "8", "MAX_SAMPLES": "8", "STAGES": "first",
           "GEN_ARGS": f"max_length={MAX_LENGTH} max_prompt_length=128"}
    res = subprocess.run(["bash", str(REPO / "pipeline_shapes.sh")], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-4000:]
    return exp


def sidecar(exp, name):
    return yaml.safe_load((exp / "traces" / f"{name}.yaml").read_text())


def test_assets_have_the_real_vocabularies_and_special_ids(shapes_run):
    assets = shapes_run / "assets"
    real = make_assets.real_shapes()
    for name in ("teacher", "proxy", "student"):
        config = json.loads((assets / name / "config.json").read_text())
        assert config["vocab_size"] == real[name]["config"]["vocab_size"]
        assert config["tie_word_embeddings"] == real[name]["config"]["tie_word_embeddings"]
    student = json.loads((assets / "student" / "config.json").read_text())
    assert student["rope_parameters"]["rope_type"] == "llama3"
    for name, layout in (("teacher", real["teacher"]["tokenizer"]), ("student", real["student"]["tokenizer"])):
        tok = utils.load_tokenizer(str(assets / name))
        assert len(tok) == layout["size"]
        assert {tok.convert_tokens_to_ids(text): i for i, text in layout["specials"].items()} == \
            {int(i): int(i) for i in layout["specials"]}


def test_every_trace_runs_to_max_length_on_the_tokenizers_ids(shapes_run):
    """Untrained models never end a trace; the engine samples only ids the tokenizer defines."""
    tok = utils.load_tokenizer(str(shapes_run / "assets" / "teacher"))
    for name, vocab in (("holdout", 151665), ("tau9.00e-01_lam5.00e-02_eps1.00e-02", 151665),
                        ("eval_student_base", 128256)):
        side = sidecar(shapes_run, name)
        assert side["stats"]["n"] == 8 and side["stats"]["finished_fraction"] == 0.0
        assert side["diagnostics"]["vocab_size"] == vocab
    import pandas as pd
    rows = pd.read_parquet(shapes_run / "traces" / "holdout.parquet")
    for system, question, n in zip(rows["system"], rows["question"], rows["n_tokens"]):
        prompt = utils.render_generation_prompt(tok, system, question)  # ends in <think>\n, as generation did
        assert len(tok(prompt, add_special_tokens=False).input_ids) + n == MAX_LENGTH


def test_the_gradient_and_the_fd_check_use_the_proxys_own_width(shapes_run):
    with safe_open(str(shapes_run / "student_grads.safetensors"), "pt") as f:
        embed = [k for k in f.keys() if k.endswith("embed_tokens.weight")]
        assert len(embed) == 1 and f.get_slice(embed[0]).get_shape() == [151936, 32]
        assert float(f.metadata()["grad_norm"]) > 0 and f.metadata()["memory_cap_gib"] == "None"
    diagnostics = sidecar(shapes_run, "tau9.00e-01_lam5.00e-02_eps1.00e-02")["diagnostics"]
    assert diagnostics["fd_positions"] > 0 and diagnostics["fd_cosine_median"] > 0.99


def test_stage_3_runs_through_the_engine_and_the_reference_loop_and_gives_ratios(shapes_run):
    """pipeline_shapes.sh's same-run measurement of the reference approach, for the ADS row and the
    temperature row: the same prompts decoded to the same lengths by both paths (tokens may differ: an
    untrained model's near-flat distributions put draws on ties that float rounding decides), and
    decode-rate ratios that bench/project_grid.py reads."""
    import sys

    import pandas as pd
    sys.path.insert(0, str(REPO / "bench"))
    import project_grid
    for row in ("ads", "temperature"):
        engine, reference = (pd.read_parquet(shapes_run / "traces" / f"stage3_{row}_{e}.parquet")
                             for e in ("auto", "reference"))
        assert len(engine) == 8 and list(engine["prompt"]) == list(reference["prompt"])
        assert list(engine["n_tokens"]) == list(reference["n_tokens"])
        configs = [sidecar(shapes_run, f"stage3_{row}_{e}")["config"] for e in ("auto", "reference")]
        assert [c["engine"] for c in configs] == ["auto", "reference"]
        assert {c["lam"] > 0 for c in configs} == {row == "ads"}
    ratios = project_grid.stage3_ratios(shapes_run)
    assert set(ratios) == {"ads", "plain"} and ratios["ads"] > 0 and ratios["plain"] > 0 and ratios["plain"] != 1.0
