"""The HTML template of `pluribus view` (pluribus.view): styles and the script that renders the embedded run data.

No external asset: no CDN, no font, no fetch, so the page opens from disk anywhere. Lists (problems, process rows)
are filtered and paged in the script and a problem's rounds are drawn only when it is opened, so a run of thousands
of problems costs one page of elements at a time.
"""

TEMPLATE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{TITLE}}</title>
<style>
:root { --ok: #1a7f37; --bad: #cf222e; --muted: #57606a; --line: #d0d7de; --bg2: #f6f8fa; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #1f2328; }
header { background: #24292f; color: #fff; padding: 10px 20px; position: sticky; top: 0; z-index: 2; }
header h1 { font-size: 18px; margin: 0 0 2px 0; }
header .path { color: #9ea7b3; font-size: 12px; font-family: ui-monospace, monospace; }
nav { margin-top: 8px; display: flex; gap: 4px; flex-wrap: wrap; }
nav button { background: #32383f; color: #fff; border: 0; border-radius: 6px; padding: 5px 12px; cursor: pointer;
  font-size: 13px; }
nav button.on { background: #0969da; }
nav button .n { color: #9ea7b3; margin-left: 4px; }
nav button.on .n { color: #dbeafe; }
main { padding: 16px 20px 60px; max-width: 1280px; }
section { display: none; }
section.on { display: block; }
h2 { font-size: 17px; margin: 18px 0 8px; } h3 { font-size: 15px; margin: 14px 0 6px; }
h4, h5, h6 { font-size: 14px; margin: 12px 0 6px; }
table { border-collapse: collapse; margin: 6px 0 12px; font-size: 13px; }
th, td { border: 1px solid var(--line); padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: var(--bg2); }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12px; }
pre { background: var(--bg2); padding: 8px; border-radius: 6px; white-space: pre-wrap; word-break: break-word;
  margin: 4px 0; }
img { max-width: 100%; border: 1px solid var(--line); border-radius: 6px; }
.absent { color: var(--muted); font-style: italic; padding: 12px; border: 1px dashed var(--line); border-radius: 6px; }
.muted { color: var(--muted); }
.bar { display: flex; gap: 8px; align-items: center; flex-wrap: wrap; margin: 8px 0; }
.bar input[type=search] { flex: 1; min-width: 260px; padding: 6px 10px; border: 1px solid var(--line);
  border-radius: 6px; font-size: 14px; }
.bar select, .bar button { padding: 5px 8px; border: 1px solid var(--line); border-radius: 6px; background: #fff;
  font-size: 13px; }
details.item { border: 1px solid var(--line); border-radius: 6px; margin: 4px 0; background: #fff; }
details.item > summary { padding: 5px 10px; cursor: pointer; list-style: none; display: flex; gap: 8px;
  align-items: baseline; }
details.item > summary::-webkit-details-marker { display: none; }
details.item > summary::before { content: "\25B8"; color: var(--muted); }
details.item[open] > summary::before { content: "\25BE"; }
details.item[open] > summary { border-bottom: 1px solid var(--line); background: var(--bg2); }
.body { padding: 8px 12px; }
.pid { font-family: ui-monospace, monospace; font-size: 12px; color: var(--muted); white-space: nowrap; }
.q { flex: 1; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.chip { display: inline-block; padding: 0 6px; border-radius: 10px; font-size: 12px; font-weight: 600;
  white-space: nowrap; font-family: ui-monospace, monospace; }
.chip.ok { background: #dafbe1; color: var(--ok); } .chip.bad { background: #ffebe9; color: var(--bad); }
.chip.none { background: #eaeef2; color: var(--muted); }
.tag { font-size: 11px; padding: 0 5px; border-radius: 4px; white-space: nowrap; }
.tag.fixed { background: #dafbe1; color: var(--ok); } .tag.broke { background: #ffebe9; color: var(--bad); }
.tag.switched { background: #fff8c5; color: #7d4e00; }
td.turn { min-width: 150px; max-width: 420px; }
td.turn details summary { cursor: pointer; color: var(--muted); font-size: 12px; }
.move { font-weight: 700; margin-left: 4px; }
.move.fixed { color: var(--ok); } .move.broke { color: var(--bad); } .move.switched { color: #9a6700; }
.final { margin-top: 6px; }
.step { border-left: 6px solid; border-radius: 4px; padding: 4px 8px; margin: 3px 0; display: flex; gap: 10px; }
.step .meta { white-space: nowrap; font-size: 12px; min-width: 210px; }
.step .text { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 12px; flex: 1; }
.scale { display: inline-block; width: 160px; height: 10px; vertical-align: middle; border-radius: 3px;
  background: linear-gradient(90deg, hsl(0,65%,80%), hsl(60,65%,80%), hsl(120,65%,80%)); }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 12px; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 6px 14px 10px; }
.card h3 { margin-top: 6px; }
.charts { display: flex; flex-wrap: wrap; gap: 8px; }
svg.chart { background: #fff; border: 1px solid var(--line); border-radius: 4px; }
svg.chart text { font: 10px system-ui, sans-serif; fill: #57606a; }
</style>
</head>
<body>
<header>
  <h1 id="title"></h1>
  <div class="path" id="runpath"></div>
  <nav id="nav"></nav>
</header>
<main id="main"></main>
<script type="application/json" id="data">{{DATA}}</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const PAGE = 50;

function esc(s) {
  return String(s === null || s === undefined ? "" : s).replace(/[&<>"']/g,
    c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}
function absent(text) { return `<div class="absent">${esc(text)}</div>`; }
function pct(x) { return (100 * x).toFixed(1) + "%"; }
function num(x) { return typeof x === "number" ? (Number.isInteger(x) ? String(x) : x.toPrecision(4)) : esc(x); }
function chip(answer, correct) {
  const cls = answer === null || answer === undefined ? "none" : correct ? "ok" : "bad";
  const mark = cls === "none" ? "?" : correct ? "\u2713" : "\u2717";
  return `<span class="chip ${cls}">${mark} ${esc(answer === null || answer === undefined ? "unparsable" : answer)}</span>`;
}
function hue(s) { return Math.max(0, Math.min(1, s)) * 120; }

// ------------------------------------------------------------------------------------ a filtered, paged list
// items: the data; match(item, q): search; filters: {name: predicate}; head(item): summary html; body(item): html
function makeList(root, opts) {
  const st = {q: "", filter: "all", page: 0};
  root.innerHTML = `<div class="bar">
      <input type="search" class="search" placeholder="${esc(opts.placeholder)}" aria-label="search">
      <select class="filter">${Object.keys(opts.filters).map(f => `<option>${esc(f)}</option>`).join("")}</select>
      <button class="prev">\u2190</button><span class="count muted"></span><button class="next">\u2192</button>
    </div><div class="items"></div>`;
  const items = root.querySelector(".items"), count = root.querySelector(".count");
  function matching() {
    const q = st.q.trim().toLowerCase(), keep = opts.filters[st.filter];
    return opts.items.filter(it => keep(it) && (!q || opts.match(it, q)));
  }
  function draw() {
    const found = matching(), pages = Math.max(1, Math.ceil(found.length / PAGE));
    st.page = Math.min(st.page, pages - 1);
    const shown = found.slice(st.page * PAGE, (st.page + 1) * PAGE);
    count.textContent = found.length
      ? `${st.page * PAGE + 1}\u2013${st.page * PAGE + shown.length} of ${found.length}` +
        (found.length < opts.items.length ? ` (${opts.items.length} in all)` : "")
      : `none of ${opts.items.length} match`;
    items.innerHTML = shown.map((it, i) =>
      `<details class="item" data-i="${st.page * PAGE + i}" data-id="${esc(opts.key(it))}"><summary>${opts.head(it)}</summary></details>`).join("");
    items.querySelectorAll("details.item").forEach(d => d.addEventListener("toggle", () => {
      if (d.open && !d.querySelector(".body")) {
        const div = document.createElement("div");
        div.className = "body";
        div.innerHTML = opts.body(found[+d.dataset.i]);
        d.appendChild(div);
      }
    }));
  }
  root.querySelector(".search").addEventListener("input", e => { st.q = e.target.value; st.page = 0; draw(); });
  root.querySelector(".filter").addEventListener("change", e => { st.filter = e.target.value; st.page = 0; draw(); });
  root.querySelector(".prev").addEventListener("click", () => { st.page = Math.max(0, st.page - 1); draw(); });
  root.querySelector(".next").addEventListener("click", () => { st.page += 1; draw(); });
  draw();
}

// ------------------------------------------------------------------------------------------- the debates
function debateHead(p) {
  const tags = [p.fixed ? `<span class="tag fixed">${p.fixed} fixed</span>` : "",
                p.broke ? `<span class="tag broke">${p.broke} broke</span>` : "",
                p.switched ? `<span class="tag switched">${p.switched} switched</span>` : ""].join(" ");
  return `<span class="pid">${esc(p.id)}</span>${chip(p.final, p.ok)}<span class="muted">gold ${esc(p.gold)}</span>
    <span class="q">${esc(p.q)}</span>${tags}`;
}
const MOVES = {fixed: ["\u2197", "changed from a wrong answer to the right one"],
               broke: ["\u2198", "changed from the right answer to a wrong one"],
               switched: ["\u2194", "changed its answer, wrong (or unparsable) before and after"]};
function turnCell(t) {
  const move = t.ch ? `<span class="move ${esc(t.ch)}" title="${esc(MOVES[t.ch][1])}">${MOVES[t.ch][0]} ${esc(t.ch)}</span>` : "";
  const cut = t.cut ? ` <span class="muted" title="stopped at max_new_tokens">\u2702 cut</span>` : "";
  return `<td class="turn">${chip(t.a, t.c)}${move}<div class="muted">${esc(t.t)} tokens${cut}</div>
    <details><summary>response</summary><pre>${esc(t.r)}</pre></details></td>`;
}
function debateBody(p) {
  const judged = p.judge && p.judge.length;
  const rows = p.rounds.map((rnd, r) => `<tr><th>round ${r}</th>` + rnd.map(turnCell).join("") + (judged ?
    (p.judge.filter(j => j.round === r).map(turnCell).join("") || "<td></td>") : "") + "</tr>").join("");
  const votes = p.votes.map(([a, n]) => `${esc(a)} \u00d7${esc(n)}`).join(", ");
  const notes = [p.tie ? "a tie, broken by the votes over all rounds, then by agent order" : "",
                 p.stopped === null || p.stopped === undefined ? "" : `stopped after round ${esc(p.stopped)}: every agent agreed`];
  return `<p>${esc(p.q)}</p>
    <table class="debate"><thead><tr><th></th>${p.agents.map(a => `<th>${esc(a)}</th>`).join("")}${judged ? "<th>judge</th>" : ""}</tr></thead>
    <tbody>${rows}</tbody></table>
    <div class="final"><b>Final answer</b> (${esc(p.agg)}): ${chip(p.final, p.ok)} &nbsp; gold <b>${esc(p.gold)}</b>
    &nbsp; last round's answers: ${votes} &nbsp; <span class="muted">${[...notes, `${p.tokens} tokens generated`].filter(Boolean).map(esc).join(" \u00b7 ")}</span></div>`;
}
function debates(el) {
  if (!D.stores.length) { el.innerHTML = absent("No trajectory store yet: `pluribus debate` writes trajectories/."); return; }
  el.innerHTML = `<div class="bar"><label>store <select id="store">${D.stores.map((s, i) =>
    `<option value="${i}">${esc(s.name)} (${s.problems.length} problems)</option>`).join("")}</select></label>
    <span class="muted" id="storenote"></span></div><div id="storestats"></div><div id="debatelist"></div>`;
  const pick = el.querySelector("#store");
  function show() {
    const s = D.stores[+pick.value];
    const notes = [s.path, s.note, s.unreadable ? `${s.unreadable} line(s) not whole records (a writer still running, or corrupt): not shown` : "",
                   s.duplicates ? `${s.duplicates} duplicated line(s): the first of each is shown` : "", s.error || ""];
    el.querySelector("#storenote").textContent = notes.filter(Boolean).join(" \u00b7 ");
    const ps = s.problems, n = ps.length || 1;
    const r0 = ps.reduce((a, p) => a + p.rounds[0].filter(t => t.c).length, 0) /
               Math.max(1, ps.reduce((a, p) => a + p.rounds[0].length, 0));
    el.querySelector("#storestats").innerHTML = ps.length ? `<p>final answer right on <b>${pct(ps.filter(p => p.ok).length / n)}</b>
      of ${ps.length} problems; first answers right ${pct(r0)}; ${ps.reduce((a, p) => a + p.fixed, 0)} changes wrong\u2192right,
      ${ps.reduce((a, p) => a + p.broke, 0)} right\u2192wrong, ${ps.reduce((a, p) => a + p.switched, 0)} wrong\u2192wrong.</p>` : "";
    makeList(el.querySelector("#debatelist"), {
      items: ps, key: p => p.id, head: debateHead, body: debateBody,
      placeholder: "search problems: id, question, gold or final answer",
      match: (p, q) => p.id.toLowerCase().includes(q) || p.q.toLowerCase().includes(q) ||
                       String(p.gold).toLowerCase() === q || String(p.final).toLowerCase() === q,
      filters: {"all": () => true, "final right": p => p.ok, "final wrong": p => !p.ok,
                "someone fixed (wrong\u2192right)": p => p.fixed > 0, "someone broke (right\u2192wrong)": p => p.broke > 0,
                "someone changed their mind": p => p.fixed + p.broke + p.switched > 0},
    });
  }
  pick.addEventListener("change", show);
  show();
}

// ------------------------------------------------------------------------------------------ the process rows
function labelled(r) { return r.labels.some(l => l !== null); }
function processHead(r) {
  const bad = r.labels.indexOf(false);
  // the last step's score is its trace's own grade (no rollout), not a Monte-Carlo estimate
  const known = r.scores.slice(0, r.steps.length - 1).filter(x => x !== null);
  const low = known.length ? Math.min(...known) : null;
  const verdict = !labelled(r) ? '<span class="chip none">no labels</span>' : bad >= 0 ?
    `<span class="chip bad">first bad step ${bad}</span>` : r.labels.includes(null) ?
    '<span class="chip none">no bad step labelled</span>' : '<span class="chip ok">all steps good</span>';
  return `<span class="pid">${esc(r.id)}</span><span class="muted">${esc(r.agent)}${r.round === null ? "" : " r" + esc(r.round)}</span>
    <span>${r.steps.length} steps</span>${verdict}<span class="muted">lowest MC ${low === null ? "n/a" : low.toFixed(2)}</span>
    <span class="q">${esc(r.prompt)}</span>`;
}
function scoreText(r, i, sc) {
  if (sc === null) return "MC n/a";
  if (i === r.steps.length - 1 && (sc === 0 || sc === 1)) return sc ? "answer right" : "answer wrong";
  return `MC ${sc.toFixed(2)}`;
}
function processBody(r) {
  const extra = Object.keys(r.extra);
  const steps = r.steps.map((s, i) => {
    const sc = r.scores[i] === undefined ? null : r.scores[i], h = sc === null ? null : hue(sc);
    const others = extra.map(k => { const v = r.extra[k][i];
      return v === null ? ` <span class="chip none">${esc(k)} n/a</span>` :
        ` <span class="chip" style="background:hsl(${hue(v)},65%,85%)">${esc(k)} ${v.toFixed(2)}</span>`; }).join("");
    const label = r.labels[i] === true ? '<span class="chip ok">\u2713 good</span>' :
      r.labels[i] === false ? '<span class="chip bad">\u2717 bad</span>' : '<span class="chip none">no label</span>';
    return `<div class="step" style="${h === null ? "border-color:#8c959f;background:#f6f8fa" : `border-color:hsl(${h},60%,42%);background:hsl(${h},65%,94%)`}">
      <div class="meta">#${i} ${label}
      ${scoreText(r, i, sc)}${others}${r.debate[i] ? ` <span class="muted">${esc(r.debate[i])}</span>` : ""}</div>
      <div class="text">${esc(s)}</div></div>`;
  }).join("");
  return `<pre>${esc(r.prompt)}</pre>${steps}`;
}
function processRows(el) {
  if (!D.process.length) { el.innerHTML = absent("No process dataset yet: `pluribus build --kind process` writes datasets/process/."); return; }
  el.innerHTML = `<p>Each step is coloured by its Monte-Carlo score (MC: the fraction of rollouts from that step that reach the
    gold answer; the last step, which has nothing left to roll out, by whether the trace's own answer is right)
    <span class="scale"></span> 0 \u2192 1, and marked by its label (good where the score is above the build's
    threshold; with build.monotone_labels every step after the first bad one is bad); a PRM's per-step score, where a row carries
    one, is shown beside it.</p><div class="bar"><label>dataset <select id="pset">${D.process.map((s, i) =>
    `<option value="${i}">${esc(s.name)} (${s.rows.length} rows)</option>`).join("")}</select></label>
    <span class="muted" id="ppath"></span></div><div id="plist"></div>`;
  const pick = el.querySelector("#pset");
  function show() {
    const s = D.process[+pick.value];
    el.querySelector("#ppath").textContent = s.path;
    makeList(el.querySelector("#plist"), {
      items: s.rows, key: r => r.id, head: processHead, body: processBody,
      placeholder: "search rows: problem id, prompt or step text",
      match: (r, q) => r.id.toLowerCase().includes(q) || r.prompt.toLowerCase().includes(q) ||
                       r.steps.some(x => x.toLowerCase().includes(q)),
      filters: {"all": () => true, "a bad step": r => r.labels.includes(false),
                "all steps good": r => labelled(r) && r.labels.every(l => l === true)},
    });
  }
  pick.addEventListener("change", show);
  show();
}

// -------------------------------------------------------------------------------------------- the experts
function short(v) {  // an axis number in a few characters: 1.80e-4, 0.4333, 1.2e+5
  return v !== 0 && (Math.abs(v) < 1e-2 || Math.abs(v) >= 1e5) ? v.toExponential(2) : String(+v.toPrecision(4));
}
function chart(name, pts, undrawn) {
  const note = undrawn ? ` (${undrawn} nan/inf not drawn)` : "";
  if (!pts.length) return `<div class="absent">${esc(name)}: every logged value is nan or inf</div>`;
  const W = 240, H = 130, L = 48, R = 8, T = 16, B = 22;
  const xs = pts.map(p => p[0]), ys = pts.map(p => p[1]);
  // reduce, not Math.min(...xs): a long training logs more steps than a call may take arguments
  const lo = a => a.reduce((m, v) => v < m ? v : m), hi = a => a.reduce((m, v) => v > m ? v : m);
  let x0 = lo(xs), x1 = hi(xs), y0 = lo(ys), y1 = hi(ys);
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) { const d = Math.abs(y0) * 0.05 || 1; y0 -= d; y1 += d; }
  const X = x => L + (x - x0) / (x1 - x0) * (W - L - R), Y = y => T + (y1 - y) / (y1 - y0) * (H - T - B);
  const line = pts.map(p => `${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join(" ");
  const dots = pts.length <= 60 ? pts.map(p => `<circle cx="${X(p[0]).toFixed(1)}" cy="${Y(p[1]).toFixed(1)}" r="2" fill="#0969da"><title>step ${p[0]}: ${num(p[1])}</title></circle>`).join("") : "";
  return `<svg class="chart" width="${W}" height="${H}" role="img" aria-label="${esc(name)}">
    <text x="${L}" y="11" style="font-weight:600;fill:#1f2328">${esc(name + note)}</text>
    <line x1="${L}" y1="${H - B}" x2="${W - R}" y2="${H - B}" stroke="#d0d7de"/><line x1="${L}" y1="${T}" x2="${L}" y2="${H - B}" stroke="#d0d7de"/>
    <text x="${L - 4}" y="${T + 4}" text-anchor="end">${short(y1)}</text><text x="${L - 4}" y="${H - B}" text-anchor="end">${short(y0)}</text>
    <text x="${L}" y="${H - 6}">step ${num(x0)}</text><text x="${W - R}" y="${H - 6}" text-anchor="end">${num(x1)}</text>
    <polyline fill="none" stroke="#0969da" stroke-width="1.5" points="${line}"/>${dots}</svg>`;
}
function kv(obj) {
  const keys = Object.keys(obj || {});
  return keys.length ? `<table>${keys.map(k => `<tr><th>${esc(k)}</th><td class="num">${num(obj[k])}</td></tr>`).join("")}</table>` : "";
}
function experts(el) {
  if (!D.experts.length) { el.innerHTML = absent("No expert yet: `pluribus train` writes adapters/<name>/."); return; }
  el.innerHTML = `<div class="cards">${D.experts.map(e => {
    if (e.absent) return `<div class="card"><h3>${esc(e.name)}</h3>${absent(e.absent)}<div class="muted">${esc(e.path)}</div></div>`;
    const names = [...new Set([...Object.keys(e.curves), ...Object.keys(e.undrawn || {})])];
    return `<div class="card expert" data-name="${esc(e.name)}"><h3>${esc(e.name)}${e.objective ? ` <span class="muted">(${esc(e.objective)})</span>` : ""}</h3>
      <div class="muted">${[["base", e.base], ["data", e.dataset], ["finished", e.finished]].filter(kv => kv[1])
        .map(kv => `${kv[0]} ${esc(kv[1])}`).join(" \u00b7 ")}${e.running ? "not finished: no adapter yet (a training " +
        "still running, or stopped before its end); the curves are its latest checkpoint's" : ""}</div>
      <div class="charts">${names.length ? names.map(k => chart(k, e.curves[k] || [], (e.undrawn || {})[k])).join("") :
        absent("no logged steps (the record has no log_history and no checkpoint kept one)")}</div>
      <details><summary>final metrics and data</summary>${kv(e.metrics)}${kv(e.data)}</details>
      <div class="muted">${esc(e.path)}</div></div>`;
  }).join("")}</div>`;
}

// ---------------------------------------------------------------------------------- merges, eval, the rest
function merges(el) {
  if (!D.merges.length) { el.innerHTML = absent("No merge yet: `pluribus merge` writes merged/<name>/."); return; }
  el.innerHTML = D.merges.map(m => `<div class="card merge"><h3>${esc(m.name)}</h3><div class="muted">${esc(m.path)}</div>
    ${m.report ? `<pre>${esc(m.lines.join("\n"))}</pre>` : absent(m.report_file ? "merge_report.json is not readable JSON" : "no merge_report.json")}
    ${m.spec ? `<details><summary>merge.yaml</summary><pre>${esc(m.spec)}</pre></details>` : ""}</div>`).join("");
}
function evalPart(el) {
  el.innerHTML = D.eval ? `<div class="muted">${esc(D.eval.path)}</div>${D.eval.html}`
                        : absent("No eval yet: `pluribus eval` writes eval/report.md and its plots.");
}
function overview(el) {
  const stages = D.stages.length ? `<table><tr><th>step</th><th>finished</th><th>output</th></tr>${D.stages.map(s =>
    `<tr><td>${esc(s.step)}</td><td>${esc(s.finished)}</td><td><code>${esc(s.output)}</code></td></tr>`).join("")}</table>`
    : absent(D.run.stages_unreadable ? "stages.json is there but not a readable record of steps; not shown."
             : "No step recorded yet (stages.json is written by `pluribus run` after each step).");
  const data = D.datasets.length ? `<table><tr><th>dataset</th><th>rows</th><th>path</th></tr>${D.datasets.map(d =>
    `<tr><td>${esc(d.name)}</td><td class="num">${d.rows}</td><td><code>${esc(d.path)}</code></td></tr>`).join("")}</table>`
    : absent("No dataset yet: `pluribus build` writes datasets/<kind>/.");
  const stores = D.stores.length ? `<table><tr><th>trajectory store</th><th>problems</th><th>final answer right</th><th></th></tr>${D.stores.map(s =>
    `<tr><td>${esc(s.name)}</td><td class="num">${s.problems.length}</td><td class="num">${s.problems.length ?
      pct(s.problems.filter(p => p.ok).length / s.problems.length) : ""}</td><td class="muted">${esc(s.note)}</td></tr>`).join("")}</table>` : absent("No trajectory store yet.");
  el.innerHTML = `<h2>Steps run</h2>${stages}<h2>Trajectory stores</h2>${stores}<h2>Datasets</h2>${data}`;
}
function recipe(el) {
  el.innerHTML = D.recipe ? `<pre>${esc(D.recipe)}</pre>` : absent("No recipe.yaml in the run folder.");
}

const TABS = [["overview", "Overview", overview, null], ["eval", "Eval", evalPart, null],
  ["debates", "Debates", debates, D.stores.length ? D.stores[0].problems.length : 0],
  ["process", "Process rows", processRows, D.process.length ? D.process[0].rows.length : 0],
  ["experts", "Experts", experts, D.experts.length], ["merges", "Merges", merges, D.merges.length],
  ["recipe", "Recipe", recipe, null]];
document.getElementById("title").textContent = "pluribus run " + D.run.name;
document.getElementById("runpath").textContent = D.run.path;
const nav = document.getElementById("nav"), main = document.getElementById("main"), drawn = {};
for (const [id, label, , n] of TABS) {
  nav.insertAdjacentHTML("beforeend", `<button data-tab="${id}">${label}${n === null ? "" : `<span class="n">${n}</span>`}</button>`);
  main.insertAdjacentHTML("beforeend", `<section id="${id}"></section>`);
}
function open(id) {
  const tab = TABS.find(t => t[0] === id) || TABS[0];
  if (!drawn[tab[0]]) { tab[2](document.getElementById(tab[0])); drawn[tab[0]] = true; }
  document.querySelectorAll("section").forEach(s => s.classList.toggle("on", s.id === tab[0]));
  document.querySelectorAll("nav button").forEach(b => b.classList.toggle("on", b.dataset.tab === tab[0]));
}
nav.addEventListener("click", e => { const b = e.target.closest("button"); if (b) { history.replaceState(null, "", "#" + b.dataset.tab); open(b.dataset.tab); } });
open(location.hash.slice(1) || (D.eval ? "eval" : "overview"));
</script>
</body>
</html>
"""
