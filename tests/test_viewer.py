"""viewer.py on a hand-built experiment: the page's content in Python, then rendered by real headless Chromium."""
import html
import json
import re

import datasets
import pytest

import grid
import report
import utils
import viewer

TEMPERATURE, ADS, PERMUTED = grid.Row(1.5, 0.0, 0.0), grid.Row(0.9, 0.05, 0.01), grid.Row(0.9, 0.05, 0.01, "permute")
OLD = grid.Row(0.9, 0.1, 0.01)  # train traces written before gentraces.py recorded tokens: no tokens column
RECORDED = (0, 1)               # the problems whose tokens are recorded (gentraces' idx < N)
# awkward token texts: markup, entities, both quotes, newlines, a closing script tag, non-ASCII
TEXTS = ["<think>", "\n", "Tom & Jerry", ' say "hi"', " it's", " </script>", " naïve 🙂", "\n\n", "\\boxed{4}"]


def tokens_json(row: grid.Row, idx: int) -> str:
    """A `tokens` value as gentraces.py records it: the row's settings and every generated token."""
    toks = [{"t": t, "lp": -0.7 * (i % 7), "ads": row.lam * (i - 4), "alt": [["<alt&" + str(k), -2.0 - k, 0.01 * k]
                                                                            for k in range(i % 5)]}
            for i, t in enumerate(TEXTS + [f" #{idx}"])]
    return json.dumps({"tau": row.tau, "lam": row.lam, "control": row.control, "tokens": toks})


def trace_rows(row: grid.Row, with_tokens: bool = True) -> list[dict]:
    rows = []
    for idx in range(3):
        completion = "".join(TEXTS) + f" #{idx}"
        rows.append({"idx": idx, "question": f"Q{idx}: is 2 < 3 & \"x\" > 'y'?\nsecond line", "gold": "4",
                     "system": "", "prompt": "p", "completion": completion, "has_marker": True,
                     "n_tokens": len(TEXTS) + 1, "finished": True, "forced": "4}", "raw_pred": "4",
                     "af_pred": "4" if idx else "<5>", "raw_correct": True, "af_correct": bool(idx),
                     "trace": "p" + completion})
        if with_tokens:
            rows[-1]["tokens"] = tokens_json(row, idx) if idx in RECORDED else ""
    return rows


def save_traces(exp_dir, name, rows, role, row=None, af=0.5):
    """What gentraces.save_outputs writes: parquet, the registry line (its keys), the dataset directory."""
    traces = exp_dir / "traces"
    traces.mkdir(parents=True, exist_ok=True)
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(traces / f"{name}.parquet"))
    utils.append_registry(exp_dir, {
        "name": name, "path": str(traces / name), "data_split": "gsm8k_train" if role == "train" else "gsm8k_test",
        "model": "teacher", "tau": row.tau if row else 0.0, "lam": row.lam if row else 0.0,
        "eps": row.eps if row else 0.0, "n": len(rows), "raw_accuracy": af, "af_accuracy": af,
        "role": role, "row": row.fields() if row else None, "student_seed": None})
    ds.save_to_disk(str(traces / name))


@pytest.fixture
def exp_dir(tmp_path):
    for row, af in [(TEMPERATURE, 0.625), (ADS, 0.25), (PERMUTED, 0.5)]:
        save_traces(tmp_path, row.name, trace_rows(row), "train", row, af)
        save_traces(tmp_path, f"eval_teacher_{row.name}", trace_rows(row), "teacher_eval", row, af)
    save_traces(tmp_path, OLD.name, trace_rows(OLD, with_tokens=False), "train", OLD)
    save_traces(tmp_path, "holdout", trace_rows(TEMPERATURE), "holdout")  # no grid row: not shown
    return tmp_path


def entries(exp_dir):
    return report.load_registry(exp_dir / "metadata" / "trace_registry.jsonl")


EXPECTED = 3 * len(RECORDED)  # three rows with tokens, two recorded problems each


def test_page_shows_every_row_and_recorded_problem_escaped(exp_dir):
    path = exp_dir / "traces.html"
    assert viewer.write_traces_html(entries(exp_dir), exp_dir, path) == EXPECTED
    page = path.read_text(encoding="utf-8")
    assert page.count('class="panel"') == EXPECTED
    for label in ("temperature  τ=1.5", "ADS  τ=0.9 λ=0.05 ε=0.01", "ADS, permute control  τ=0.9 λ=0.05 ε=0.01"):
        assert page.count(f"<h3>{label}</h3>") == len(RECORDED)
    assert [int(i) for i in re.findall(r"<h2>gsm8k_train #(\d+)</h2>", page)] == list(RECORDED)  # idx 2: not recorded
    assert page.count(html.escape("Q0: is 2 < 3 & \"x\" > 'y'?\nsecond line")) == 1  # once per problem
    for text in TEXTS:
        assert f">{html.escape(text)}</span>" in page
    assert "<think>" not in page and page.count("</script>") == 2  # only the page's own two scripts
    assert "train traces af 62.5%" in page and "train traces af 25.0%" in page
    assert 'answer <code>&lt;5&gt;</code> <b class="bad">wrong</b>' in page
    assert f"{OLD.name} (no tokens recorded" in page  # the older trace set is named, not shown
    assert "holdout" not in page and "eval_teacher" not in page
    # the tooltip: the token's numbers and alternatives, escaped inside the attribute
    assert 'title="&#x27;Tom &amp; Jerry&#x27;\nlp -1.400  ads -0.100  share 0.06  score -1.656\n' in page
    assert "&#x27;&lt;alt&amp;1&#x27;  -3.000  +0.010" in page


def test_page_without_recorded_tokens_shows_nothing_and_says_why(tmp_path):
    save_traces(tmp_path, OLD.name, trace_rows(OLD, with_tokens=False), "train", OLD)
    assert viewer.write_traces_html(entries(tmp_path), tmp_path, tmp_path / "traces.html") == 0
    assert "Not shown: " + OLD.name in (tmp_path / "traces.html").read_text()


def test_unreadable_tokens_are_named_not_fatal(exp_dir):
    rows = [dict(r, tokens="{not json" if r["tokens"] else "") for r in trace_rows(OLD)]
    save_traces(exp_dir, OLD.name, rows, "train", OLD)  # the rerun replaces the registry entry
    assert viewer.write_traces_html(entries(exp_dir), exp_dir, exp_dir / "traces.html") == EXPECTED
    assert f"{OLD.name} (unreadable (JSONDecodeError: " in (exp_dir / "traces.html").read_text()


def test_report_writes_the_page_before_its_sentinel(exp_dir, capsys):
    report.main(["--exp-dir", str(exp_dir)])
    assert f"traces.html shows {EXPECTED} train traces" in capsys.readouterr().out
    assert (exp_dir / "traces.html").stat().st_mtime_ns <= (exp_dir / "report.md").stat().st_mtime_ns


def test_cli_writes_the_page(exp_dir, capsys):
    viewer.main(["--exp-dir", str(exp_dir)])
    assert f"viewer.py: {EXPECTED} traces" in capsys.readouterr().out
    assert (exp_dir / "traces.html").is_file()


def test_chromium_renders_the_page_without_errors(exp_dir, chromium, tmp_path):
    path = exp_dir / "traces.html"
    viewer.write_traces_html(entries(exp_dir), exp_dir, path)
    dom = viewer.headless(path, "--dump-dom")
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-status="ok"' in body and 'data-errors="0"' in body and f'data-traces="{EXPECTED}"' in body, body
    assert '<div id="errors"></div>' in dom
    assert dom.count('class="panel"') == EXPECTED

    png = tmp_path / "x.png"
    viewer.screenshot(path, png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) == (1400, 1000)


def test_chromium_shows_a_broken_page_as_an_error(exp_dir, chromium):
    """The page's own check: a panel lost between writing and rendering is an error, not ok."""
    path = exp_dir / "traces.html"
    viewer.write_traces_html(entries(exp_dir), exp_dir, path)
    path.write_text(path.read_text(encoding="utf-8").replace('class="panel"', 'class="gone"', 1), encoding="utf-8")
    dom = viewer.headless(path, "--dump-dom")
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-status="error"' in body and 'data-errors="1"' in body, body
    assert f"{EXPECTED - 1} panels, expected {EXPECTED}" in dom


def test_cli_screenshot_takes_the_asked_size(exp_dir, chromium, tmp_path, capsys):
    png = tmp_path / "wide.png"
    viewer.main(["--exp-dir", str(exp_dir), "--screenshot", str(png), "--width", "2400", "--height", "700"])
    data = png.read_bytes()
    assert (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) == (2400, 700)


@pytest.mark.parametrize("flag,value", [("--width", "0"), ("--height", "-5"), ("--width", "90000")])
def test_cli_refuses_a_screenshot_size_out_of_range(exp_dir, flag, value):
    with pytest.raises(utils.ConfigError, match=f"^error: {flag[2:]} must be"):
        viewer.main(["--exp-dir", str(exp_dir), flag, value])
