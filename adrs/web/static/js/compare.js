// Compare runs (best so far, counts) or candidates from any runs (scores, per-layer error, code diffs).
"use strict";
(() => {
  const {el, clear, getJSON, fmt, candUrl, apiUrl, enc, bestSoFar} = ADRS;
  const params = new URLSearchParams(location.search);
  const root = document.getElementById("compare");
  const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"];

  function chart(title, config) {
    const canvas = el("canvas");
    root.append(el("figure", {}, el("figcaption", {}, title), el("div", {class: "chartbox wide"}, canvas)));
    return new Chart(canvas, config);
  }

  async function compareRuns(keys) {
    const data = await Promise.all(keys.map((k) => getJSON(apiUrl(k, "candidates"))));
    const head = ["run", "candidates", "valid", "failed", "flagged/rejected", "best", "best score", "held-out of best"];
    root.append(el("table", {class: "grid"}, el("thead", {}, el("tr", {}, head.map((h) => el("th", {}, h)))),
      el("tbody", {}, data.map((d) => {
        const best = d.rows.find((r) => r.best);
        const n = (s) => d.rows.filter((r) => r.status === s).length;
        return el("tr", {}, el("td", {}, el("a", {href: `/run/${enc(d.run)}`}, d.run)), el("td", {class: "num"}, d.rows.length),
          el("td", {class: "num"}, n("valid")), el("td", {class: "num"}, n("failed")), el("td", {class: "num"}, n("rejected")),
          el("td", {}, best ? el("a", {href: candUrl(d.run, best.id)}, best.id) : "-"),
          el("td", {class: "num"}, fmt(best && best.score)), el("td", {class: "num"}, fmt(best && best.heldout)));
      }))));
    chart("Best so far against iteration", {type: "line", data: {datasets: data.map((d, i) => ({label: d.run, data: bestSoFar(d.rows),
      stepped: "after", borderColor: COLORS[i % COLORS.length], pointRadius: 0}))},
      options: {animation: false, maintainAspectRatio: false, scales: {x: {type: "linear", title: {display: true, text: "iteration"}, ticks: {precision: 0}},
                y: {title: {display: true, text: "best combined score"}}}}});
  }

  async function compareCandidates(specs) {
    const parsed = specs.map((s) => { const i = s.lastIndexOf(":"); return {run: s.slice(0, i), cand: s.slice(i + 1)}; });
    const details = await Promise.all(parsed.map((p) => getJSON(apiUrl(p.run, `candidate/${enc(p.cand)}`))));
    const rowsOf = [["run", (d) => d.run], ["status", (d) => d.row.status + (d.row.flag ? ` (${d.row.flag})` : "")],
      ["score", (d) => fmt(d.row.score)], ["held-out", (d) => fmt(d.row.heldout)], ["faithful", (d) => fmt(d.row.faithful)],
      ["error", (d) => fmt(d.row.error, 4)], ["density", (d) => fmt(d.row.density, 4)], ["author", (d) => d.row.author],
      ["parent", (d) => d.row.parent || "-"], ["summary", (d) => d.row.summary], ["failure / rejection", (d) => d.row.reason || ""]];
    root.append(el("table", {class: "grid kvwide"},
      el("thead", {}, el("tr", {}, el("th", {}, ""), details.map((d) => el("th", {}, el("a", {href: candUrl(d.run, d.row.id)}, `${d.run}:${d.row.id}`))))),
      el("tbody", {}, rowsOf.map(([label, get]) => el("tr", {}, el("th", {}, label), details.map((d) => el("td", {}, get(d))))))));
    const layers = [...new Set(details.flatMap((d) => d.per_layer.map((r) => r.layer)))].sort((a, b) => a - b);
    for (const [key, title] of [["error", "Relative error per layer"], ["density", "Density per layer"]]) {
      chart(title, {type: "line", data: {labels: layers, datasets: details.map((d, i) => ({label: `${d.run}:${d.row.id}`,
        data: layers.map((l) => { const r = d.per_layer.find((x) => x.layer === l); return r ? r[key] : null; }),
        borderColor: COLORS[i % COLORS.length], backgroundColor: COLORS[i % COLORS.length]}))},
        options: {animation: false, maintainAspectRatio: false, scales: {x: {title: {display: true, text: "layer"}}}}});
    }
    for (const other of specs.slice(1)) {
      const {diff, a, b} = await getJSON(`/api/diff?a=${enc(specs[0])}&b=${enc(other)}`);
      const code = el("code", {class: "language-diff"});
      code.textContent = diff || "(identical code)";
      root.append(el("h2", {}, `Diff ${a} → ${b}`), el("pre", {class: "code"}, code));
      if (window.hljs && diff) hljs.highlightElement(code);
    }
  }

  async function main() {
    const runs = await getJSON("/api/runs");
    const select = document.querySelector("#pick select[name=run]");
    select.append(...runs.map((r) => el("option", {value: r.key}, r.key)));
    document.getElementById("pick").addEventListener("submit", (e) => {
      e.preventDefault();
      const cand = e.target.cand.value.trim();
      if (cand) { params.append("c", `${select.value}:${cand}`); params.delete("run"); location.search = params.toString(); }
    });
    const runKeys = params.getAll("run"), cands = params.getAll("c");
    if (runKeys.length) await compareRuns(runKeys);
    else if (cands.length) await compareCandidates(cands);
    else root.append(el("p", {class: "hint"}, "Nothing chosen yet."));
  }
  main().catch((err) => ADRS.error(root, err));
})();
