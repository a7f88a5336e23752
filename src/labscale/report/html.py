"""The HTML report: one self-contained file (inline SVG charts, inline CSS and JavaScript, the data as JSON in the
page; nothing is fetched, so it opens offline), built from the database alone.

Contents: the verdict table (report/verdicts.py); a verdict-coloured results matrix; per task, quality against
$ per 1,000 examples and against latency per example for every model × setting (95% CI whiskers, the Pareto
frontier, dominated points grey, estimated figures hollow — report/figures.py); adaptation cost against quality
gain; fairness per group (bars with CIs, the worst group marked); a drill-down from every run to its examples
(input, prompt, output, parsed answer, gold, per-example score; the adapter card for adapted models) with
filters by task / model / setting and a side-by-side view of the examples two runs disagree on; and the whole
markdown report below, rendered.

Every text from the database reaches the page escaped (server-side `html.escape`, client-side `textContent`).
"""

from __future__ import annotations

import datetime as dt
import html
import json
import re
from pathlib import Path

from labscale.engine.store import Store, require_db
from labscale.report.format import fmt
from labscale.report.runs import StoredRun, adapter_runs, shown_metric

MAX_TEXT = 20_000  # characters of one prompt / output kept in the page


def _e(x) -> str:
    return html.escape(str(x), quote=True)


# -- the markdown report, rendered (headings, tables, lists, paragraphs, **bold**, *em*, `code`) ----------------


def _inline(text: str) -> str:
    t = _e(text)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    t = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", t)
    t = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"<em>\1</em>", t)
    return t


def _cells(line: str) -> list[str]:
    inner = line.strip()[1:-1] if line.strip().endswith("|") else line.strip()[1:]
    parts = re.split(r"(?<!\\)\|", inner)
    return [p.strip().replace("\\|", "|") for p in parts]


def markdown_to_html(text: str) -> str:
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"^(#{1,4}) (.*)$", line)
        if m:
            level = len(m.group(1)) + 1  # the page has its own h1
            out.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
            i += 1
        elif line.startswith("|") and i + 1 < len(lines) and re.match(r"^\|(-+\|)+$", lines[i + 1].strip()):
            head = _cells(line)
            i += 2
            body = []
            while i < len(lines) and lines[i].startswith("|"):
                body.append(_cells(lines[i]))
                i += 1
            out.append("<table><thead><tr>" + "".join(f"<th>{_inline(h)}</th>" for h in head) + "</tr></thead><tbody>"
                       + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in body)
                       + "</tbody></table>")
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(lines[i][2:])
                i += 1
            out.append("<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in items) + "</ul>")
        elif not line.strip():
            i += 1
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not lines[i].startswith(("|", "- ", "#")):
                para.append(lines[i])
                i += 1
            out.append(f"<p>{_inline(' '.join(para))}</p>")
    return "\n".join(out)


# -- data for the drill-down -----------------------------------------------------------------------------------


def _cut(text: str | None) -> str | None:
    if text is None:
        return None
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + f" […{len(text) - MAX_TEXT} characters cut]"


def _example_rows(store: Store, run: StoredRun, metric: str) -> list[list]:
    rows = []
    for p in store.predictions(run.id):
        stats = json.loads(p["stats_json"])
        s = stats.get(metric)
        score = s[0] if isinstance(s, list) and len(s) == 1 else (s if isinstance(s, (int, float)) else None)
        keys = p.keys()
        rows.append([p["example_id"], _cut(p["input"] if "input" in keys else None), _cut(p["prompt"]),
                     _cut(p["output"]), _cut(p["prediction"]), _cut(p["target"]), score, p["error"]])
    return rows


def _finite(obj):
    """The structure with NaN / ±inf floats as None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _page_data(store: Store, runs: list[StoredRun], verdicts) -> dict:
    by_run = {v.run_id: v for v in verdicts}
    out_runs, examples = [], {}
    for r in runs:
        metric = shown_metric(r, r.task_info["main_metric"])
        v = by_run.get(r.id)
        s = r.scores.get(metric)
        out_runs.append({
            "id": r.id, "task": r.task, "model": r.model, "setting": r.setting, "protocol": r.protocol,
            "metric": metric, "complete": r.complete,
            "score": None if s is None else [s["value"], s["ci_low"], s["ci_high"]],
            "verdict": None if v is None else v.verdict, "verdict_text": None if v is None else v.text,
            "reference": None if v is None or v.reference is None else v.reference.id,
            "card": r.adaptation})
        if r.complete:
            examples[r.id] = _example_rows(store, r, metric)
    return _finite({"runs": out_runs, "examples": examples})


# -- charts ------------------------------------------------------------------------------------------------------


def _charts(runs: list[StoredRun], verdicts) -> list[str]:
    from labscale.report import plots
    from labscale.report.figures import adaptation_cost, latency_ms, run_cost

    by_run = {v.run_id: v for v in verdicts}
    parts = []
    tasks = list(dict.fromkeys(r.task for r in runs))
    columns = list(dict.fromkeys(f"{r.model} · {r.setting}" for r in runs))
    cells = {}
    for r in runs:
        v = by_run.get(r.id)
        s = r.scores.get(shown_metric(r, r.task_info["main_metric"]))
        cells[(r.task, f"{r.model} · {r.setting}")] = (fmt(s["value"]) if s and r.complete else "pending",
                                                       v.verdict if v else None)
    parts.append('<figure class="chart" id="matrix">' + plots.verdict_matrix(tasks, columns, cells) + "</figure>")
    for task in tasks:
        task_runs = [r for r in runs if r.task == task and r.complete]
        if not task_runs:
            continue
        metric = shown_metric(task_runs[0], task_runs[0].task_info["main_metric"])
        hib = bool(task_runs[0].scores[metric]["higher_is_better"]) if metric in task_runs[0].scores else True
        cost_points, latency_points = [], []
        for r in task_runs:
            s = r.scores.get(shown_metric(r, r.task_info["main_metric"]))
            if not s or s["value"] is None:
                continue
            v = by_run.get(r.id)
            base = {"label": f"{r.model} · {r.setting}", "y": s["value"], "lo": s["ci_low"], "hi": s["ci_high"],
                    "verdict": v.verdict if v else None}
            c = run_cost(r)
            cost_points.append({**base, "x": c.usd_per_1000, "estimated": c.estimated})
            latency_points.append({**base, "x": latency_ms(r), "estimated": False})
        parts.append(f'<h3>{_e(task)}</h3><div class="charts">'
                     f'<figure class="chart" data-task="{_e(task)}" data-kind="cost">'
                     + plots.quality_scatter(cost_points, "$ per 1,000 examples (hollow: estimated)", metric,
                                             f"{task}: quality vs cost", hib)
                     + f'</figure><figure class="chart" data-task="{_e(task)}" data-kind="latency">'
                     + plots.quality_scatter(latency_points, "latency per example (ms)", metric,
                                             f"{task}: quality vs latency", hib) + "</figure></div>")
        parts += _fairness(task_runs, task)
    adapt_points = []
    for r, card in adapter_runs(runs):
        if not r.complete:
            continue
        metric = shown_metric(r, r.task_info["main_metric"])
        base_runs = [b for b in runs if b.task == r.task and b.complete and not b.adaptation
                     and b.model_info.get("fingerprint") == (r.model_info.get("extra") or {}).get("base_fingerprint")]
        base_runs = base_runs or [b for b in runs if b.task == r.task and b.complete and not b.adaptation
                                  and b.model == r.model]
        s = r.scores.get(metric)
        if not base_runs or not s or s["value"] is None:
            continue
        b = base_runs[0]
        bs = b.scores.get(metric)
        if not bs or bs["value"] is None:
            continue
        gain = s["value"] - bs["value"]
        lo = hi = None
        if s["ci_low"] is not None and bs["ci_low"] is not None:  # conservative: the runs' CIs combined
            lo, hi = s["ci_low"] - bs["ci_high"], s["ci_high"] - bs["ci_low"]
        cost = adaptation_cost(card)
        adapt_points.append({"label": f"{r.model} ({r.task}) vs {b.setting}", "usd": cost["usd"], "gain": gain,
                             "lo": lo, "hi": hi, "kwh": cost["kwh"], "co2eq_kg": cost["co2eq_kg"],
                             "estimated": cost["usd_estimated"], "energy_estimated": cost["energy_estimated"]})
    if adapt_points:
        parts.append("<h3>Adaptation cost vs quality gain</h3><p>Gain: the adapted model's main metric minus its "
                     "base model's best-listed run on the same task (whiskers: the two runs' CIs combined, "
                     "conservatively). Cost: an hourly hardware price × training time (an estimate); energy and "
                     "CO2eq from CodeCarbon (on a CPU machine its TDP-based estimate).</p>"
                     '<figure class="chart" id="adaptation">'
                     + plots.adaptation_chart(adapt_points, "Adaptation cost vs quality gain") + "</figure>")
    return parts


def _fairness(task_runs: list[StoredRun], task: str) -> list[str]:
    from labscale.report import plots

    parts = []
    info = task_runs[0].task_info
    for field in info.get("group_fields", []):
        series, groups = [], []
        for r in task_runs:
            metric = shown_metric(r, info["main_metric"])
            rows = [g for g in r.group_scores if g["field"] == field and g["metric"] == metric]
            vals = {g["group_name"]: (g["value"], g["ci_low"], g["ci_high"]) for g in rows if g["kind"] == "group"}
            worst = next((g["group_name"] for g in rows if g["kind"] == "worst"), None)
            if vals:
                groups += [g for g in vals if g not in groups]
                series.append({"label": f"{r.model} · {r.setting}", "values": vals, "worst": worst})
        if series:
            metric = shown_metric(task_runs[0], info["main_metric"])
            parts.append(f'<figure class="chart" data-task="{_e(task)}" data-kind="fairness">'
                         + plots.fairness_chart(groups, series, f"{task}: {metric} by {field}", metric) + "</figure>")
    return parts


# -- the page -----------------------------------------------------------------------------------------------------


def _verdict_table(verdicts) -> str:
    rows = []
    for v in verdicts:
        ref = v.reference
        diff = "—" if v.diff is None else f"{fmt(v.diff)} [{fmt(v.low)}, {fmt(v.high)}]"
        cls = (v.verdict or "na").replace(" ", "-")
        rows.append(f'<tr data-run="{_e(v.run_id)}"><td>{_e(v.task)}</td><td>{_e(v.model)}</td>'
                    f"<td>{_e(v.setting)}</td><td>{_e(v.metric)}</td><td>{_e(fmt(v.value))}</td>"
                    f'<td><span class="badge v-{_e(cls)}">{_e(v.text)}</span></td><td>{_e(diff)}</td>'
                    f"<td>{_e('—' if ref is None else f'{ref.model} · {ref.setting}')}</td>"
                    f'<td><button class="link" data-drill="{_e(v.run_id)}">examples</button>'
                    + (f' <button class="link" data-compare="{_e(v.run_id)}" data-with="{_e(ref.id)}">vs reference'
                       "</button>" if ref is not None and ref.id != v.run_id else "") + "</td></tr>")
    return ("<table id=\"verdicts\"><thead><tr><th>task</th><th>model</th><th>setting</th><th>metric</th>"
            "<th>score</th><th>verdict</th><th>model − reference [95% CI]</th><th>reference</th><th></th></tr></thead>"
            "<tbody>" + "".join(rows) + "</tbody></table>")


def build_html(store: Store, experiment: str | None = None, bootstrap_samples: int | None = None) -> str:
    from labscale.report.markdown import build_report
    from labscale.report.verdicts import compute_verdicts

    markdown = build_report(store, experiment, bootstrap_samples)  # raises the one-line error for no results
    exp = store.latest_experiment(experiment)
    assert exp is not None  # build_report raised otherwise
    config = json.loads(exp["config_json"])
    runs = [StoredRun(store, r) for r in store.experiment_runs(exp["id"])]
    n_boot = bootstrap_samples or config.get("bootstrap_samples", 1000)
    verdicts = compute_verdicts(runs, config, n_boot, config.get("seed", 0))
    data = _page_data(store, runs, verdicts)
    when = dt.datetime.fromtimestamp(exp["finished_at"] or exp["started_at"], dt.timezone.utc)
    # the data block is JSON inside <script>: "<" escaped so no text can close the element
    blob = json.dumps(data, ensure_ascii=False, allow_nan=False, default=str).replace("<", "\\u003c")
    return (_HEAD.replace("__TITLE__", _e(f"labscale report — {exp['name']}"))
            + f"<header><h1>labscale report — {_e(exp['name'])}</h1><p>Config <code>{_e(exp['config_hash'])}</code>"
            f" · {when:%Y-%m-%d %H:%M} UTC · {len(runs)} runs · generated from the database alone; opens offline."
            "</p></header><main>"
            '<nav><a href="#s-verdicts">Verdicts</a> <a href="#s-charts">Charts</a> <a href="#s-drill">Examples</a> '
            '<a href="#s-compare">Disagreements</a> <a href="#s-report">Full report</a></nav>'
            '<section id="s-verdicts"><h2>Verdicts</h2><p>Each run against its task\'s reference on the main metric '
            "(paired bootstrap 95% CI of model − reference; see the full report for the rules and margins). "
            "<em>examples</em> opens a run's examples; <em>vs reference</em> shows where the two disagree.</p>"
            + _verdict_table(verdicts) + "</section>"
            '<section id="s-charts"><h2>Charts</h2>' + "".join(_charts(runs, verdicts)) + "</section>"
            + _DRILL + '<section id="s-report"><h2>Full report</h2>' + markdown_to_html(markdown) + "</section>"
            + f'</main><script type="application/json" id="data">{blob}</script><script>{_JS}</script></body></html>')


def write_html(db: Path, out: Path | None = None, experiment: str | None = None) -> Path:
    from labscale.atomic import write_atomic
    from labscale.report.markdown import check_output

    require_db(db)
    store = Store(db, readonly=True)
    try:
        text = build_html(store, experiment)
    finally:
        store.close()
    out = out or db.with_suffix(".html")
    check_output(out)
    write_atomic(out, text)
    return out


_HEAD = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:">
<style>
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2330;background:#fbfbfc}
header{background:#1d2330;color:#fff;padding:12px 24px} header h1{margin:0 0 4px;font-size:20px}
header p{margin:0;font-size:13px;opacity:.85} main{padding:8px 24px 40px;max-width:1400px}
nav{position:sticky;top:0;background:#fbfbfc;padding:8px 0;border-bottom:1px solid #e3e6eb;z-index:2}
nav a{margin-right:14px;color:#1f5fbf;text-decoration:none;font-size:14px}
h2{margin-top:28px;border-bottom:1px solid #e3e6eb;padding-bottom:4px} h3{margin-top:22px}
table{border-collapse:collapse;font-size:13px;margin:8px 0 14px} th,td{border:1px solid #dfe3ea;padding:4px 8px;
text-align:left;vertical-align:top} th{background:#f0f2f6} tbody tr:hover{background:#f5f8ff}
code{background:#eef1f5;padding:1px 4px;border-radius:3px;font-size:12px} header code{background:#3a4358;color:#fff}
.badge{padding:2px 7px;border-radius:10px;font-size:12px;white-space:nowrap;background:#eee}
.v-better{background:#d7f0d9;color:#1b5e20} .v-within-margin{background:#dbe8fb;color:#0d47a1}
.v-worse{background:#fadbd8;color:#b71c1c} .v-inconclusive{background:#fdebc8;color:#8a4b00}
.v-reference{background:#eadcf2;color:#4a148c}
.charts{display:flex;flex-wrap:wrap;gap:16px} figure.chart{margin:6px 0;max-width:100%;overflow-x:auto}
figure.chart svg{max-width:100%;height:auto}
button.link{background:none;border:none;color:#1f5fbf;cursor:pointer;padding:0;font-size:12px;text-decoration:underline}
.filters{display:flex;gap:12px;flex-wrap:wrap;align-items:center;margin:8px 0} select,input{font-size:13px;padding:3px}
pre{white-space:pre-wrap;word-wrap:break-word;margin:0;font-size:12px;max-height:260px;overflow:auto;
font-family:ui-monospace,Menlo,Consolas,monospace} td.num{text-align:right}
.card{background:#f3f0f7;border:1px solid #ddd3ea;padding:8px;border-radius:4px;font-size:12px;margin:6px 0}
.muted{color:#6b7480;font-size:12px} tr.err td{background:#fff3f3}
</style></head><body>"""

_DRILL = """
<section id="s-drill"><h2>Examples</h2>
<p>Every run's examples as stored: input, output, parsed answer, gold and the per-example score on the run's main
metric (click a row for the exact prompt). Pick a run by task, model and setting.</p>
<div class="filters"><label>task <select id="f-task"></select></label><label>model <select id="f-model"></select>
</label><label>setting <select id="f-setting"></select></label><label>search <input id="f-text" type="search"
placeholder="text in input / output / gold"></label><label><input id="f-wrong" type="checkbox"> score below the
best only</label></div>
<div id="run-info"></div><table id="examples"><thead><tr><th>example</th><th>input</th><th>output</th>
<th>parsed</th><th>gold</th><th>score</th></tr></thead><tbody></tbody></table><p class="muted" id="ex-count"></p>
</section>
<section id="s-compare"><h2>Disagreements</h2>
<p>Two runs of one task side by side, on the examples where their per-example scores or parsed answers differ.</p>
<div class="filters"><label>run A <select id="c-a"></select></label><label>run B <select id="c-b"></select></label>
</div><table id="compare"><thead><tr><th>example</th><th>input</th><th id="c-ha">A</th><th id="c-hb">B</th>
<th>gold</th></tr></thead><tbody></tbody></table><p class="muted" id="c-count"></p>
</section>"""

_JS = r"""
"use strict";
const DATA = JSON.parse(document.getElementById("data").textContent);
const runs = DATA.runs, byId = Object.fromEntries(runs.map((r) => [r.id, r]));
const $ = (id) => document.getElementById(id);
const LIMIT = 300;
function opt(sel, values, keep) {
  const cur = keep && values.includes(sel.value) ? sel.value : values[0];
  sel.replaceChildren(...values.map((v) => { const o = document.createElement("option"); o.value = v;
    o.textContent = v; return o; }));
  if (cur !== undefined) { sel.value = cur; }
}
function uniq(a) { return [...new Set(a)]; }
function label(r) { return r.model + " · " + r.setting; }
function cell(tr, text, cls) {
  const td = document.createElement("td"); if (cls) { td.className = cls; }
  const pre = document.createElement("pre"); pre.textContent = text === null || text === undefined ? "" : String(text);
  td.append(pre); tr.append(td); return td;
}
function fmt(x) { return x === null || x === undefined ? "n/a" : (Math.abs(x) >= 10 ? x.toFixed(1) : x.toFixed(3)); }
function currentRun() {
  return runs.find((r) => r.task === $("f-task").value && r.model === $("f-model").value &&
                          r.setting === $("f-setting").value);
}
function refreshFilters() {
  opt($("f-task"), uniq(runs.map((r) => r.task)), true);
  const t = runs.filter((r) => r.task === $("f-task").value);
  opt($("f-model"), uniq(t.map((r) => r.model)), true);
  opt($("f-setting"), uniq(t.filter((r) => r.model === $("f-model").value).map((r) => r.setting)), true);
}
function drawExamples() {
  const r = currentRun(), body = $("examples").tBodies[0], info = $("run-info");
  body.replaceChildren(); info.replaceChildren();
  if (!r) { $("ex-count").textContent = "no run"; return; }
  const head = document.createElement("p");
  head.textContent = r.task + " · " + label(r) + " — " + r.metric + " " + (r.score ? fmt(r.score[0]) + " [" +
    fmt(r.score[1]) + ", " + fmt(r.score[2]) + "]" : "n/a") + (r.verdict_text ? " — " + r.verdict_text : "") +
    " (" + r.protocol + ")";
  info.append(head);
  if (r.card) { const c = document.createElement("pre"); c.className = "card"; c.id = "card";
    c.textContent = "adapter card: " + JSON.stringify(r.card, null, 1); info.append(c); }
  const rows = DATA.examples[r.id] || [];
  const q = $("f-text").value.toLowerCase();
  const scores = rows.map((x) => x[6]).filter((s) => typeof s === "number");
  const best = scores.length ? Math.max(...scores) : null;
  const shown = rows.filter((x) => (!q || [x[1], x[3], x[5], x[2]].some((t) => t && t.toLowerCase().includes(q))) &&
    (!$("f-wrong").checked || (typeof x[6] === "number" && x[6] < best)));
  for (const x of shown.slice(0, LIMIT)) {
    const tr = document.createElement("tr"); tr.className = "ex" + (x[7] ? " err" : ""); tr.dataset.example = x[0];
    cell(tr, x[0]); cell(tr, x[1] === null ? "(see prompt)" : x[1]); cell(tr, x[7] ? "request failed: " + x[7] : x[3]);
    cell(tr, x[4]); cell(tr, x[5]); cell(tr, typeof x[6] === "number" ? fmt(x[6]) : "", "num");
    tr.onclick = () => {
      const next = tr.nextElementSibling;
      if (next && next.classList.contains("prompt")) { next.remove(); return; }
      const p = document.createElement("tr"); p.className = "prompt"; const td = cell(p, "prompt:\n" + x[2]);
      td.colSpan = 6; tr.after(p);
    };
    body.append(tr);
  }
  $("ex-count").textContent = shown.length + " of " + rows.length + " examples" +
    (shown.length > LIMIT ? " (first " + LIMIT + " shown; narrow the search)" : "");
}
function drill(runId) {
  const r = byId[runId]; if (!r) { return; }
  $("f-task").value = r.task; refreshFilters(); $("f-model").value = r.model; refreshFilters();
  $("f-setting").value = r.setting; drawExamples(); $("s-drill").scrollIntoView();
}
function compareOptions(keepA, keepB) {
  const opts = runs.filter((r) => DATA.examples[r.id]).map((r) => r.id);
  for (const [sel, keep] of [[$("c-a"), keepA], [$("c-b"), keepB]]) {
    sel.replaceChildren(...opts.map((id) => { const o = document.createElement("option"); o.value = id;
      o.textContent = byId[id].task + " · " + label(byId[id]); return o; }));
    if (keep) { sel.value = keep; }
  }
  if (!keepB && opts.length > 1) { $("c-b").value = opts.find((id) => id !== $("c-a").value &&
    byId[id].task === byId[$("c-a").value].task) || opts[1]; }
}
function drawCompare() {
  const a = byId[$("c-a").value], b = byId[$("c-b").value], body = $("compare").tBodies[0];
  body.replaceChildren();
  if (!a || !b) { return; }
  $("c-ha").textContent = "A: " + label(a); $("c-hb").textContent = "B: " + label(b);
  if (a.task !== b.task) { $("c-count").textContent = "pick two runs of the same task"; return; }
  const rb = Object.fromEntries((DATA.examples[b.id] || []).map((x) => [x[0], x]));
  let n = 0, total = 0;
  for (const x of DATA.examples[a.id] || []) {
    const y = rb[x[0]]; if (!y) { continue; } total++;
    if (x[6] === y[6] && x[4] === y[4]) { continue; }
    n++; if (n > LIMIT) { continue; }
    const tr = document.createElement("tr"); tr.className = "diff"; tr.dataset.example = x[0];
    cell(tr, x[0]); cell(tr, x[1] === null ? x[2] : x[1]);
    cell(tr, (x[3] || "") + "\n→ " + x[4] + "  (score " + fmt(x[6]) + ")");
    cell(tr, (y[3] || "") + "\n→ " + y[4] + "  (score " + fmt(y[6]) + ")"); cell(tr, x[5]);
    body.append(tr);
  }
  $("c-count").textContent = n + " of " + total + " shared examples differ" + (n > LIMIT ? " (first " + LIMIT +
    " shown)" : "");
}
for (const id of ["f-task", "f-model"]) { $(id).onchange = () => { refreshFilters(); drawExamples(); }; }
$("f-setting").onchange = drawExamples; $("f-text").oninput = drawExamples; $("f-wrong").onchange = drawExamples;
$("c-a").onchange = () => { compareOptions($("c-a").value, null); drawCompare(); }; $("c-b").onchange = drawCompare;
document.querySelectorAll("[data-drill]").forEach((b) => { b.onclick = () => drill(b.dataset.drill); });
document.querySelectorAll("[data-compare]").forEach((b) => { b.onclick = () => {
  compareOptions(b.dataset.compare, b.dataset.with); drawCompare(); $("s-compare").scrollIntoView(); }; });
refreshFilters(); drawExamples(); compareOptions(null, null); drawCompare();
"""
