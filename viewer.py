"""Write EXP_DIR/traces.html: the train traces' recorded tokens, each coloured by how far the sampler moved it.

For every grid row whose train traces carry gentraces.py's `tokens` column, the recorded problems are
laid out side by side, one panel per row: every generated token is a span whose background says how
unlikely the teacher found it and whose underline says how much of its sampling score was the ADS term;
hovering (or clicking) a token shows its log-prob, ADS term and the top alternatives.  The page is one
static file (no server, nothing fetched); a script marks <body data-status="ok" data-traces=N> once it
has checked the page and records any error in data-errors, so a headless browser's DOM shows both.
report.py writes the page too; this CLI rewrites it alone, and --screenshot renders it with Chromium.

    python viewer.py --exp-dir exp/synth --screenshot exp/synth/traces.png --width 2400
"""
import html
import json
import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Annotated

from pydantic import Field

import utils
from utils import die

KIND_ORDER = ("temperature", "ads", "control")  # the panels' order within a problem
LP_EDGES = (0.1, 0.5, 1.0, 2.0, 3.0, 5.0)  # -lp thresholds of the background classes l1..l6 (l0: lp > -0.1)
SHARE_STEPS = 4                               # the ADS share shown in quarters (s0..s4)
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage",  # containers give /dev/shm 64 MB, too little for a renderer
                  "--virtual-time-budget=5000")

CSS = """body{font:14px system-ui,sans-serif;margin:1em;color:#111}
.problem{border-top:2px solid #888;margin-top:1.5em}.q{white-space:pre-wrap;background:#f4f4f4;padding:.5em}
.panels{display:flex;gap:.8em;overflow-x:auto}.panel{flex:1 0 360px;border:1px solid #ccc;padding:.4em}
.panel h3{font-size:14px;margin:.2em 0}.meta{font-size:12px;color:#444}.ok{color:#080}.bad{color:#b00}
.text{font:13px/1.7 ui-monospace,monospace;white-space:pre-wrap;max-height:70vh;overflow-y:auto}
.t{border-bottom:3px solid transparent;cursor:help}.t.nl::before{content:"\\21B5";opacity:.4}
#info{position:fixed;right:1em;bottom:1em;max-width:32em;white-space:pre-wrap;background:#ffd;
border:1px solid #999;padding:.5em;font:12px ui-monospace,monospace}#errors{color:#b00;white-space:pre-wrap}
.legend span.t{display:inline-block;min-width:4.5em;text-align:center;margin:2px}
""" + "".join(f".l{k}{{background:rgba(220,50,32,{0.8 * k / len(LP_EDGES):.2f})}}" for k in range(1, len(LP_EDGES) + 1)) \
    + "".join(f".s{k}.up{{border-bottom-color:rgba(37,99,235,{k / SHARE_STEPS:.2f})}}"
              f".s{k}.dn{{border-bottom-color:rgba(230,130,0,{k / SHARE_STEPS:.2f})}}" for k in range(1, SHARE_STEPS + 1))

# installed first, so an error anywhere below is shown on the page and in <body data-errors>
ONERROR = """window.onerror = function (msg, src, line) {
  var box = document.getElementById("errors"); if (box) box.textContent += msg + " (line " + line + ")\\n";
  if (document.body) { document.body.dataset.errors = Number(document.body.dataset.errors) + 1;
                       document.body.dataset.status = "error"; }
};"""
# after the content: a clicked token's details stay in the corner (tooltips vanish and cannot be copied);
# then the page checks that every panel arrived before it says ok
CHECK = """document.addEventListener("click", function (e) {
  if (e.target.classList.contains("t")) document.getElementById("info").textContent = e.target.title;
});
var panels = document.querySelectorAll(".panel").length, body = document.body;
if (panels !== Number(body.dataset.expected)) throw new Error(panels + " panels, expected " + body.dataset.expected);
body.dataset.traces = panels; if (body.dataset.errors === "0") body.dataset.status = "ok";"""


def row_label(row: dict) -> str:
    """A panel's heading: the row's kind and the settings that made its traces."""
    kind = {"temperature": "temperature", "ads": "ADS"}.get(row["kind"], f"ADS, {row['control']} control")
    return f"{kind}  τ={row['tau']:g}" + ("" if row["kind"] == "temperature" else f" λ={row['lam']:g} ε={row['eps']:g}")


def read_traces(entries: dict, exp_dir: Path):
    """[(entry, [trace rows with recorded tokens])] per grid row's train traces, in panel order, and the
    [(name, why)] of train traces that show nothing (older trace sets have no tokens column)."""
    import pyarrow.parquet as pq
    shown, skipped = [], []
    train = [e for e in entries.values() if e["role"] == "train" and e.get("row")]
    for entry in sorted(train, key=lambda e: (KIND_ORDER.index(e["row"]["kind"]), e["row"]["tau"], e["row"]["lam"])):
        path = exp_dir / "traces" / f"{entry['name']}.parquet"
        if not path.is_file():
            skipped.append((entry["name"], "no parquet file"))
            continue
        try:  # a trace set this page cannot read is named on it: the report is worth more than the page
            names = pq.read_schema(path).names
            if "tokens" not in names:
                skipped.append((entry["name"], "no tokens recorded (written before gentraces.py recorded them)"))
                continue
            cols = [c for c in ("idx", "question", "gold", "af_pred", "af_correct", "tokens") if c in names]
            rows = [dict(r, tokens=json.loads(r["tokens"])) for r in pq.read_table(path, columns=cols).to_pylist()
                    if r["tokens"]]  # only the columns shown: the traces' prompts are long
        except (OSError, ValueError) as e:  # pyarrow's errors for a bad file; json's decode error is a ValueError
            skipped.append((entry["name"], f"unreadable ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})"))
            continue
        if rows:
            shown.append((entry, rows))
        else:
            skipped.append((entry["name"], "no row has tokens"))
    return shown, skipped


def token_span(tok: dict, tau: float) -> str:
    """One token: background class by the teacher's lp, underline class by the ADS term's share of the
    score (blue: ADS raised the token's score, orange: lowered it), and its numbers as the tooltip."""
    lp, ads = float(tok["lp"]), float(tok.get("ads") or 0.0)
    base = lp / tau if tau > 0 else lp
    share = abs(ads) / (abs(base) + abs(ads)) if ads else 0.0
    classes = f"t l{sum(-lp > e for e in LP_EDGES)} s{round(share * SHARE_STEPS)} {'up' if ads > 0 else 'dn'}"
    classes += " nl" if "\n" in tok["t"] else ""
    tip = [repr(tok["t"]), f"lp {lp:.3f}  ads {ads:+.3f}  share {share:.2f}  "
           f"score {base + ads:.3f}", "alternatives (text, lp, ads):"]
    tip += [f"  {t!r}  {a_lp:.3f}  {a_ads:+.3f}" for t, a_lp, a_ads in tok.get("alt", [])]
    tip = html.escape("\n".join(tip))  # quote=True: the text may hold quotes
    return f'<span class="{classes}" title="{tip}">{html.escape(tok["t"])}</span>'


def panel(entry: dict, trace: dict) -> str:
    toks, tau = trace["tokens"]["tokens"], float(trace["tokens"].get("tau", entry["row"]["tau"]))
    mark = '<b class="ok">correct</b>' if trace.get("af_correct") else '<b class="bad">wrong</b>'
    acc = "-" if entry.get("af_accuracy") is None else f"{100 * entry['af_accuracy']:.1f}%"
    mean_lp = sum(float(t["lp"]) for t in toks) / max(1, len(toks))
    return (f'<div class="panel"><h3>{html.escape(row_label(entry["row"]))}</h3><div class="meta">'
            f'answer <code>{html.escape(str(trace.get("af_pred")))}</code> {mark} · train traces af {acc} '
            f'(n={html.escape(str(entry.get("n", "-")))}) · {len(toks)} tokens, mean lp {mean_lp:.2f} · '
            f'{html.escape(entry["name"])}</div><div class="text">{"".join(token_span(t, tau) for t in toks)}</div></div>')


def legend() -> str:
    labels = [f"p&gt;{math.exp(-LP_EDGES[0]):.2g}"] + [f"p&lt;{math.exp(-e):.2g}" for e in LP_EDGES]
    lps = "".join(f'<span class="t l{k}">{label}</span>' for k, label in enumerate(labels))
    shares = {d: "".join(f'<span class="t s{k} {d}">{k / SHARE_STEPS:.2f}</span>' for k in range(1, SHARE_STEPS + 1))
              for d in ("up", "dn")}
    return (f'<div class="legend"><p>Background: the teacher\'s probability of the chosen token '
            f'(darker: less likely under the teacher) {lps}</p><p>Underline: the ADS term\'s share of the token\'s '
            f'sampling score, |ads| / (|lp/τ| + |ads|), blue where ADS raised the score {shares["up"]} and orange '
            f'where it lowered it {shares["dn"]}</p><p>Hover a token for its log-prob, ADS term and the top alternatives by score; '
            f'click to keep them in the corner. ↵ marks a newline.</p></div>')


def write_traces_html(entries: dict, exp_dir: Path, path: Path) -> int:
    """Write the page (to a temporary name, then renamed); the number of trace panels it shows."""
    shown, skipped = read_traces(entries, Path(exp_dir))
    problems = {}  # (split, idx) -> {"question", "gold", "panels"}: one problem across every row
    for entry, rows in shown:
        for r in rows:
            p = problems.setdefault((entry.get("data_split", ""), r["idx"]), dict(r, panels=[]))
            p["panels"].append(panel(entry, r))
    n = sum(len(p["panels"]) for p in problems.values())
    body = [f"<h1>Train traces, token by token: {n} traces of {len(shown)} grid rows</h1>", legend()]
    if skipped:
        body.append("<p class=meta>Not shown: " + "; ".join(html.escape(f"{s} ({why})") for s, why in skipped) + "</p>")
    for (split, idx), p in sorted(problems.items()):
        body.append(f'<div class="problem"><h2>{html.escape(f"{split} #{idx}")}</h2><div class="q">'
                    f'{html.escape(str(p.get("question", "")))}</div><p>gold <code>{html.escape(str(p.get("gold")))}'
                    f'</code></p><div class="panels">{"".join(p["panels"])}</div></div>')
    page = (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>ADS traces</title><style>{CSS}</style>'
            f'<script>{ONERROR}</script></head><body data-status="loading" data-errors="0" data-expected="{n}">'
            f'<div id="errors"></div>{"".join(body)}<div id="info">click a token</div><script>{CHECK}</script></body></html>\n')
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return n


def headless(html_path: Path, *args: str, timeout: float = 120) -> str:
    """Run headless Chromium on the page with extra `args` (a fresh profile each time); its stdout."""
    exe = shutil.which("chromium")
    if exe is None:
        raise RuntimeError("chromium not found on PATH (Debian: apt-get install -y chromium)")
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args,
                               Path(html_path).resolve().as_uri()], capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"chromium exited with {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1]}")
    return proc.stdout


def screenshot(html_path: Path, png_path: Path, width: int = 1400, height: int = 1000) -> None:
    """A PNG of the page's first width x height pixels, as Chromium renders it."""
    headless(html_path, f"--screenshot={Path(png_path).resolve()}", f"--window-size={width},{height}")
    if not Path(png_path).is_file():
        raise RuntimeError(f"chromium wrote no screenshot at {png_path}")


class ViewerSettings(utils.Settings):
    """viewer.py's flags with their types: the registry is read from exp_dir, the page written there."""
    exp_dir: utils.InputDir
    screenshot: str | None
    width: Annotated[int, Field(ge=200, le=8000)]
    height: Annotated[int, Field(ge=200, le=8000)]

    def problems(self, context):
        paths = [Path(self.exp_dir) / "traces.html"] + ([Path(self.screenshot)] if self.screenshot else [])
        return [f"{p} {problem}" for p in paths if (problem := utils.output_file_problem(p))]


def main(argv=None) -> None:
    parser = utils.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exp-dir", required=True, help="experiment directory holding metadata/ and traces/")
    parser.add_argument("--screenshot", help="also write a PNG of the page rendered by headless Chromium")
    parser.add_argument("--width", type=int, default=1400, help="the screenshot's width in pixels "
                        "(a panel is 360 wide: 2,400 shows six rows side by side)")
    parser.add_argument("--height", type=int, default=1000, help="the screenshot's height in pixels")
    args = utils.check_settings(ViewerSettings, vars(parser.parse_args(argv)))
    exp_dir = Path(args.exp_dir)
    n = write_traces_html(utils.load_registry(exp_dir / "metadata" / "trace_registry.jsonl"), exp_dir,
                          exp_dir / "traces.html")
    print(f"viewer.py: {n} traces -> {exp_dir}/traces.html")
    if args.screenshot:
        try:
            screenshot(exp_dir / "traces.html", Path(args.screenshot), args.width, args.height)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            die(f"screenshot: {e}")
        print(f"viewer.py: screenshot -> {args.screenshot}")


if __name__ == "__main__":
    utils.run_cli(main)
