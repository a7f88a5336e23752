"""The rating page: one HTML file with its CSS and JavaScript inline (nothing is loaded from elsewhere). It holds no
data: items come from the API one at a time, and every text is inserted with textContent (never as HTML)."""

from __future__ import annotations

# The grade definitions of Wang et al. (2023), "Self-Instruct", §4.4, as LaMini-LM used them.
DEFINITIONS = {
    "A": "The response is valid and satisfying.",
    "B": "The response is acceptable but has minor errors or imperfections.",
    "C": "The response is relevant and responds to the instruction, but it has significant errors in the content.",
    "D": "The response is irrelevant or completely invalid.",
}

PAIRWISE_LABELS = {
    "left": "A is better",
    "right": "B is better",
    "tie": "Tie (both equally good)",
    "both_bad": "Both are bad",
}

PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>labscale rate</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
header{background:#1d2330;color:#fff;padding:10px 20px;display:flex;gap:20px;align-items:center}
header h1{font-size:17px;margin:0;font-weight:600} #who{margin-left:auto;font-size:13px;opacity:.85}
#who a{color:#9cc3ff;margin-left:8px}
main{max-width:1200px;margin:0 auto;padding:16px 20px}
.bar{height:8px;background:#dde2ea;border-radius:4px;overflow:hidden;margin:6px 0 14px}
.bar div{height:100%;background:#3b7ddd;width:0}
.box{background:#fff;border:1px solid #d8dde6;border-radius:6px;padding:12px 14px;margin-bottom:12px}
.box h2{font-size:13px;text-transform:uppercase;letter-spacing:.04em;color:#5a6578;margin:0 0 6px}
pre{white-space:pre-wrap;word-wrap:break-word;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;
margin:0;max-height:340px;overflow:auto}
.cols{display:grid;grid-template-columns:1fr 1fr;gap:12px}
.grades{display:grid;grid-template-columns:auto 1fr;gap:8px 12px;align-items:center}
button{font-size:15px;padding:8px 16px;border-radius:5px;border:1px solid #9aa6b8;background:#fff;cursor:pointer;
min-width:120px} button:hover{background:#e9f1ff;border-color:#3b7ddd}
button kbd{font-size:11px;color:#5a6578;margin-left:6px}
.choices{display:flex;gap:10px;flex-wrap:wrap} .def{font-size:14px;color:#333}
#msg{color:#b3261e;min-height:1.2em} #done{font-size:18px} .hint{font-size:12px;color:#5a6578}
input[type=text]{font-size:15px;padding:7px 10px;border:1px solid #9aa6b8;border-radius:5px;width:260px}
</style></head>
<body>
<header><h1>labscale rate</h1><span id="mode"></span><span id="who"></span></header>
<main>
<section id="start" hidden>
  <div class="box"><h2>Who is rating?</h2>
  <p>Enter your rater id (letters, digits, space, <code>_ . @ -</code>). Use the same id to continue later.</p>
  <form id="startform"><input type="text" id="rater" autocomplete="off" required maxlength="64">
  <button type="submit">Start</button></form></div>
</section>
<section id="rate" hidden>
  <div id="progress"></div><div class="bar"><div id="fill"></div></div>
  <div class="box" id="instrbox"><h2>Instruction</h2><pre id="instruction"></pre></div>
  <div class="box"><h2>Input</h2><pre id="input"></pre></div>
  <div id="outputs"></div>
  <div class="box" id="buttons"></div>
  <p class="hint" id="keys"></p>
</section>
<section id="finished" hidden><div class="box"><p id="done">All items are rated. Thank you!</p></div></section>
<p id="msg" role="alert"></p>
</main>
<script type="application/json" id="cfg">__CFG__</script>
<script>
"use strict";
const CFG = JSON.parse(document.getElementById("cfg").textContent);
const params = new URLSearchParams(location.search);
if (params.get("token")) { sessionStorage.setItem("labscale-token", params.get("token")); }
const token = sessionStorage.getItem("labscale-token") || "";
const KEY = "labscale-rater";
let current = null, shownAt = 0, busy = false;
const $ = (id) => document.getElementById(id);

async function api(path, body) {
  const r = await fetch(path, {method: "POST", headers: {"Content-Type": "application/json",
                                                         "X-Labscale-Token": token}, body: JSON.stringify(body)});
  let data = {};
  try { data = await r.json(); } catch (e) { data = {error: "the server sent no JSON (" + r.status + ")"}; }
  if (!r.ok) { throw new Error(data.error || ("HTTP " + r.status)); }
  return data;
}

function show(id) { for (const s of ["start", "rate", "finished"]) { $(s).hidden = s !== id; } }

function box(title, text, id) {
  const d = document.createElement("div"); d.className = "box"; if (id) { d.id = id; }
  const h = document.createElement("h2"); h.textContent = title;
  const p = document.createElement("pre"); p.textContent = text; d.append(h, p); return d;
}

function buildButtons() {
  const b = $("buttons"); b.replaceChildren();
  if (CFG.mode === "absolute") {
    const g = document.createElement("div"); g.className = "grades";
    CFG.choices.forEach((c, i) => {
      const btn = document.createElement("button"); btn.dataset.choice = c; btn.id = "choice-" + c;
      btn.textContent = c; const k = document.createElement("kbd"); k.textContent = c.toLowerCase() + " / " + (i + 1);
      btn.append(k); btn.onclick = () => rate(c);
      const d = document.createElement("span"); d.className = "def"; d.textContent = CFG.definitions[c];
      g.append(btn, d);
    });
    b.append(g);
    $("keys").textContent = "Keys: A, B, C, D (or 1–4).";
  } else {
    const row = document.createElement("div"); row.className = "choices";
    const keys = {left: "a / 1", right: "b / 2", tie: "t / 3", both_bad: "x / 4"};
    CFG.choices.forEach((c) => {
      const btn = document.createElement("button"); btn.dataset.choice = c; btn.id = "choice-" + c;
      btn.textContent = CFG.labels[c]; const k = document.createElement("kbd"); k.textContent = keys[c];
      btn.append(k); btn.onclick = () => rate(c); row.append(btn);
    });
    b.append(row);
    $("keys").textContent = "Keys: A better = a or 1, B better = b or 2, tie = t or 3, both bad = x or 4.";
  }
}

function render(state) {
  $("who").textContent = "rater: " + state.rater;
  const sw = document.createElement("a"); sw.href = "#"; sw.textContent = "switch rater";
  sw.onclick = (e) => { e.preventDefault(); localStorage.removeItem(KEY); location.reload(); };
  $("who").append(sw);
  $("progress").textContent = state.done + " of " + state.total + " rated";
  $("fill").style.width = (100 * state.done / Math.max(1, state.total)) + "%";
  current = state.item;
  if (!current) { document.body.dataset.code = "done"; show("finished"); return; }
  show("rate");
  $("instrbox").hidden = !current.instruction;
  $("instruction").textContent = current.instruction || "";
  $("input").textContent = current.input;
  const outs = $("outputs"); outs.replaceChildren();
  if (current.outputs.length === 1) {
    outs.append(box("Response", current.outputs[0], "output"));
  } else {
    const c = document.createElement("div"); c.className = "cols";
    c.append(box("Response A", current.outputs[0], "output-a"), box("Response B", current.outputs[1], "output-b"));
    outs.append(c);
  }
  document.body.dataset.code = current.code;
  shownAt = performance.now(); window.scrollTo(0, 0);
}

async function start(rater) {
  $("msg").textContent = "";
  try {
    const state = await api("api/session", {rater: rater});
    localStorage.setItem(KEY, rater); render(state);
  } catch (e) { $("msg").textContent = e.message; show("start"); }
}

async function rate(choice) {
  if (!current || busy) { return; }
  busy = true; $("msg").textContent = "";
  const seconds = (performance.now() - shownAt) / 1000;
  try {
    render(await api("api/rate", {rater: localStorage.getItem(KEY), code: current.code, rating: choice,
                                  seconds: Math.round(seconds * 1000) / 1000}));
  } catch (e) { $("msg").textContent = e.message; }
  busy = false;
}

document.addEventListener("keydown", (e) => {
  if ($("rate").hidden || e.target.tagName === "INPUT" || e.ctrlKey || e.metaKey || e.altKey) { return; }
  const k = e.key.toLowerCase();
  const map = CFG.mode === "absolute" ? {a: "A", b: "B", c: "C", d: "D", 1: "A", 2: "B", 3: "C", 4: "D"}
                                      : {a: "left", b: "right", t: "tie", x: "both_bad", 1: "left", 2: "right",
                                         3: "tie", 4: "both_bad"};
  if (map[k]) { e.preventDefault(); rate(map[k]); }
});

$("startform").addEventListener("submit", (e) => { e.preventDefault(); start($("rater").value.trim()); });
$("mode").textContent = CFG.mode === "absolute" ? "absolute rating (A–D)" : "pairwise comparison";
buildButtons();
const saved = localStorage.getItem(KEY);
if (saved) { start(saved); } else { show("start"); }
</script>
</body></html>
"""


def page(mode: str, choices: tuple[str, ...]) -> str:
    import json

    cfg = {"mode": mode, "choices": list(choices), "definitions": DEFINITIONS, "labels": PAIRWISE_LABELS}
    return PAGE.replace("__CFG__", json.dumps(cfg).replace("<", "\\u003c"))
