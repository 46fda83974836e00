// One candidate: scores, per-layer charts against the parent, diffs, code, review, prompt and reply.
"use strict";
(() => {
  const {el, clear, getJSON, fmt, candUrl, apiUrl, run, cand} = ADRS;
  const charts = {};
  let shownDiff = null;

  // highlight.js reads the element's text and writes escaped markup; the text goes in as textContent.
  function highlight(node, text) {
    node.textContent = text;
    delete node.dataset.highlighted;
    if (window.hljs && text) hljs.highlightElement(node);
  }

  function layerChart(id, key, label, d) {
    const mine = d.per_layer, theirs = d.parent_per_layer;
    const layers = [...new Set([...mine, ...theirs].map((r) => r.layer))].sort((a, b) => a - b);
    const at = (rows) => layers.map((l) => { const r = rows.find((x) => x.layer === l); return r ? r[key] : null; });
    const datasets = [{label: `${d.row.id}`, data: at(mine), borderColor: "#1f77b4", backgroundColor: "#1f77b4"}];
    if (theirs.length) datasets.push({label: `parent ${d.parent.id}`, data: at(theirs), borderColor: "#aaa", backgroundColor: "#aaa", borderDash: [4, 3]});
    if (charts[id]) charts[id].destroy();
    charts[id] = new Chart(document.getElementById(id), {type: "line", data: {labels: layers, datasets},
      options: {animation: false, maintainAspectRatio: false, plugins: {title: {display: true, text: label}},
                scales: {x: {title: {display: true, text: "layer"}}}}});
  }

  function renderMeta(d) {
    const r = d.row;
    document.getElementById("title").textContent = `${r.id}${r.best ? " ★ best" : ""}`;
    const links = (ids) => ids.flatMap((id, i) => [i ? ", " : "", el("a", {href: candUrl(run, id)}, id)]);
    clear(document.getElementById("meta")).append(
      `iteration ${r.iteration} · island ${r.island} · ${r.status}${r.flag ? ` (${r.flag})` : ""} · author ${r.author}`,
      r.model ? ` · model ${r.model}` : "", " · parent ", r.parent ? el("a", {href: candUrl(run, r.parent)}, r.parent) : "none",
      d.children.length ? [" · children ", ...links(d.children)] : "", ` · commit ${d.commit.slice(0, 10)}`,
      el("div", {class: "summary"}, r.summary));
    const reason = document.getElementById("reason");
    const text = r.status === "rejected" ? `rejected: ${r.reason || ""}` : r.status === "failed" ? `failed (${r.category}): ${d.reason || ""}` : "";
    reason.hidden = !text;
    reason.textContent = text;
    const scores = clear(document.getElementById("scores"));
    const shown = {...d.scores, "held-out score": r.heldout, "faithful score": r.faithful};
    if (d.worst && d.worst.layer !== undefined) shown["worst record"] = `sample ${d.worst.sample} layer ${d.worst.layer}: error ${fmt(d.worst.error, 4)}`;
    for (const [k, v] of Object.entries(shown)) {
      if (v === null || v === undefined) continue;
      scores.append(el("tr", {}, el("th", {}, k), el("td", {}, typeof v === "number" && !Number.isInteger(v) ? v.toPrecision(6) : String(v))));
    }
    clear(document.getElementById("rescores")).append(d.rescores.length
      ? el("table", {class: "grid"}, d.rescores.map((e) => el("tr", {}, el("td", {}, e.why || ""), el("td", {}, e.workload_hash || ""),
          el("td", {}, e.report.valid ? `score ${fmt(e.report.combined_score)}` : `failed: ${e.report.category || ""}`))))
      : el("p", {class: "hint"}, "none (adrs rescore)"));
    document.getElementById("prompt").textContent = d.prompt ?? `(none: ${r.id} was not produced by an LLM; author ${r.author})`;
    const panel = document.getElementById("review");
    if (![...panel.querySelectorAll(".review-text")].some((i) => i.value)) ADRS.reviewPanel(panel, run, d.checkpoints, load,
      "no review checkpoint on this candidate (the run overview lists them all)");
  }

  async function showDiff(d, against) {
    const label = document.getElementById("diff-label");
    const node = document.getElementById("diff");
    if (!against) { highlight(node, "(a seed: no parent)"); label.textContent = ""; return; }
    const text = against === d.row.parent ? d.diff
      : (await getJSON(`${apiUrl(run, "diff")}?a=${encodeURIComponent(against)}&b=${encodeURIComponent(d.row.id)}`)).diff;
    highlight(node, text || "(identical code)");
    label.textContent = `git diff ${against} → ${d.row.id}`;
    shownDiff = against;
  }

  function diffPicker(d) {
    const select = document.getElementById("diff-against");
    const keep = shownDiff ?? d.row.parent ?? "";
    clear(select).append(el("option", {value: ""}, "(choose)"),
      ...d.ids.filter((id) => id !== d.row.id).map((id) => el("option", {value: id}, id === d.row.parent ? `${id} (parent)` : id)));
    select.value = keep;
    select.onchange = () => showDiff(d, select.value).catch((err) => highlight(document.getElementById("diff"), `error: ${err.message}`));
  }

  let first = true;
  async function load() {
    try {
      const d = await getJSON(apiUrl(run, `candidate/${encodeURIComponent(cand)}`));
      renderMeta(d);
      diffPicker(d);
      if (first) {  // code and diff do not change once committed: drawn once
        first = false;
        highlight(document.getElementById("code"), d.code);
        await showDiff(d, d.row.parent);
        layerChart("chart-error", "error", "relative error per layer", d);
        layerChart("chart-density", "density", "density per layer", d);
      }
    } catch (err) {
      ADRS.error(document.getElementById("meta"), err);
    }
  }
  ADRS.watch(run, load);
})();
