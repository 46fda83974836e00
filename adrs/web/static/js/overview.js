// Run overview: headline numbers, score / trade-off / throughput / failure charts, review.
"use strict";
(() => {
  const {el, clear, getJSON, fmt, candUrl, apiUrl, run} = ADRS;
  const charts = {};
  const FLAG_STYLE = {  // rejected candidates, by why: distinguishable from each other and from valid ones
    heldout: ["crossRot", "#d62728", "flagged: held-out"],
    numerics: ["triangle", "#ff7f0e", "flagged: numerics audit"],
    review: ["rect", "#8c0000", "rejected in review"],
    other: ["crossRot", "#d62728", "rejected"],
  };
  const AUTHOR_STYLE = {seed: ["rectRot", "#9467bd", "seed"], model: ["circle", "#1f77b4", "model"],
                        human: ["star", "#ff7f0e", "human patch"]};
  const DECISION_COLOR = (c) => (c.pending ? "#e6b800" : c.decision.startsWith("reject") ? "#8c0000" : "#2ca02c");

  function replaceChart(id, config) {
    if (charts[id]) charts[id].destroy();
    charts[id] = new Chart(document.getElementById(id), config);
  }

  function stat(label, ...value) { return el("div", {class: "stat"}, el("span", {class: "label"}, label), el("span", {class: "value"}, ...value)); }

  function renderStats(o) {
    const box = clear(document.getElementById("stats"));
    const best = o.best;
    const s = o.spend;
    box.append(
      stat("candidates", `${o.total} (${o.counts.valid} valid, ${o.counts.failed} failed, ${o.counts.rejected} flagged/rejected)`),
      stat("best", best ? el("a", {href: candUrl(run, best.id)}, best.id) : "-",
           best ? ` score ${fmt(best.score)} · held-out ${fmt(best.heldout)}` : ""),
      stat("evaluations / min", o.evals_per_min === null ? "-" : o.evals_per_min.toFixed(2)),
      stat("failures", Object.entries(o.failures).map(([k, n]) => `${k}: ${n}`).join(", ") || "none"),
      stat("tokens / cost", s.calls ? `${s.tokens} (${s.prompt_tokens} prompt, ${s.completion_tokens} completion) · $${s.cost_usd.toFixed(4)} over ${s.calls} call(s)` : "no LLM calls"),
      stat("workload", `${o.workload || "?"} · held-out ${o.heldout_workload || "off"} · density target ${o.density_target ?? "?"}`),
      stat("sandbox", o.isolation || "-"),
    );
  }

  function point(r, y, floor) { return {x: r.iteration, y: floor !== null ? Math.max(y, floor) : y, id: r.id}; }

  function scoreChart(o) {
    const floor = o.y_limits ? o.y_limits[0] : null;
    const rows = o.rows;
    const datasets = [];
    for (const [author, [style, color, label]] of Object.entries(AUTHOR_STYLE)) {
      const mine = rows.filter((r) => r.status === "valid" && r.author === author);
      if (mine.length) datasets.push({label, data: mine.map((r) => point(r, r.score, floor)), pointStyle: style,
                                      backgroundColor: color, borderColor: color, pointRadius: author === "human" ? 7 : 4});
    }
    for (const [flag, [style, color, label]] of Object.entries(FLAG_STYLE)) {
      const mine = rows.filter((r) => r.flag === flag && r.score !== null);
      if (mine.length) datasets.push({label, data: mine.map((r) => point(r, r.score, floor)), pointStyle: style,
                                      borderColor: color, backgroundColor: color, pointRadius: 6, borderWidth: 2});
    }
    const held = rows.filter((r) => r.heldout !== null);
    if (held.length) datasets.push({label: "held-out score", data: held.map((r) => point(r, r.heldout, floor)),
                                    pointStyle: "circle", backgroundColor: "rgba(0,0,0,0)", borderColor: "#17becf",
                                    pointRadius: 6, borderWidth: 2});
    const best = ADRS.bestSoFar(rows);
    if (best.length) datasets.push({type: "line", label: "best so far", data: best, stepped: "after", borderColor: "#000",
                                    pointRadius: 0, borderWidth: 1.5, fill: false});
    const byId = Object.fromEntries(rows.map((r) => [r.id, r]));
    const marks = o.checkpoints.filter((c) => byId[c.candidate] && byId[c.candidate].score !== null);
    if (marks.length) datasets.push({label: "review checkpoint (pending / approved / rejected)",
      data: marks.map((c) => ({x: c.iteration, y: Math.max(byId[c.candidate].score, floor ?? -Infinity), id: c.candidate})),
      pointStyle: "triangle", pointRadius: 9, backgroundColor: "rgba(0,0,0,0)", borderWidth: 2,
      borderColor: marks.map(DECISION_COLOR), pointBorderColor: marks.map(DECISION_COLOR)});
    const failed = rows.filter((r) => r.status === "failed");
    const yMin = floor ?? Math.min(...rows.filter((r) => r.score !== null).map((r) => r.score), 0);
    if (failed.length) datasets.push({label: `failed (${failed.length}, no score)`, data: failed.map((r) => ({x: r.iteration, y: yMin, id: r.id})),
                                      pointStyle: "line", rotation: 90, pointRadius: 8, borderColor: "#7f7f7f", borderWidth: 2});
    const below = floor === null ? 0 : rows.flatMap((r) => [r.score, r.heldout]).filter((s) => s !== null && s < floor).length;
    document.getElementById("score-note").textContent =
      below ? `${below} lower score(s) drawn on the bottom edge` : "";
    replaceChart("chart-score", {
      type: "scatter", data: {datasets},
      options: {
        animation: false, maintainAspectRatio: false,
        scales: {x: {title: {display: true, text: "iteration"}, ticks: {precision: 0}},
                 y: {title: {display: true, text: "combined score (higher is better)"},
                     min: o.y_limits ? o.y_limits[0] : undefined, max: o.y_limits ? o.y_limits[1] : undefined}},
        plugins: {tooltip: {callbacks: {label: (ctx) => `${ctx.raw.id || ctx.dataset.label}: ${fmt(ctx.raw.y)}`}}},
        onClick: (evt, elements, chart) => {
          const hit = elements[0] && chart.data.datasets[elements[0].datasetIndex].data[elements[0].index];
          if (hit && hit.id) location.href = candUrl(run, hit.id);
        },
      },
    });
  }

  function tradeChart(o) {
    const valid = o.rows.filter((r) => r.status === "valid" && r.error !== null && r.density !== null);
    const flat = o.flat_density;
    document.getElementById("trade-title").textContent = flat
      ? "Error against iteration (every candidate at the same density)" : "Error against density";
    const datasets = [{label: "valid candidate", data: valid.map((r) => ({x: flat ? r.iteration : r.density, y: r.error, id: r.id})),
                       backgroundColor: "#1f77b4"}];
    if (!flat && o.density_target && valid.length) {
      const errs = valid.map((r) => r.error);
      datasets.push({type: "line", label: "density target", data: [{x: o.density_target, y: Math.min(...errs)}, {x: o.density_target, y: Math.max(...errs)}],
                     borderColor: "#d62728", borderDash: [5, 4], pointRadius: 0});
    }
    replaceChart("chart-trade", {type: "scatter", data: {datasets}, options: {animation: false, maintainAspectRatio: false,
      scales: {x: {title: {display: true, text: flat ? "iteration" : "density"}, ticks: flat ? {precision: 0} : {}}, y: {title: {display: true, text: "relative error"}}},
      plugins: {tooltip: {callbacks: {label: (ctx) => `${ctx.raw.id || ""} error ${fmt(ctx.raw.y, 4)}`}}}}});
  }

  function rateChart(o) {
    replaceChart("chart-rate", {type: "bar", data: {labels: o.per_minute.map((m) => m.minute),
      datasets: [{label: "candidates committed in the minute", data: o.per_minute.map((m) => m.count), backgroundColor: "#2ca02c"}]},
      options: {animation: false, maintainAspectRatio: false, scales: {x: {title: {display: true, text: "minute since the first candidate"}},
                y: {ticks: {precision: 0}}}}});
  }

  function failureChart(o) {
    const entries = Object.entries(o.failures);
    replaceChart("chart-fail", {type: "bar", data: {labels: entries.map(([k]) => k),
      datasets: [{label: entries.length ? "failed candidates" : "no failures", data: entries.map(([, n]) => n), backgroundColor: "#7f7f7f"}]},
      options: {animation: false, maintainAspectRatio: false, indexAxis: "y", scales: {x: {ticks: {precision: 0}}}}});
  }

  async function load() {
    try {
      const o = await getJSON(apiUrl(run, "overview"));
      renderStats(o);
      scoreChart(o);
      tradeChart(o);
      rateChart(o);
      failureChart(o);
      const panel = document.getElementById("review");
      const typing = [...panel.querySelectorAll(".review-text")].some((i) => i.value);
      if (!typing) ADRS.reviewPanel(panel, run, o.checkpoints, load);
    } catch (err) {
      ADRS.error(document.getElementById("stats"), err);
    }
  }
  ADRS.watch(run, load);
})();
