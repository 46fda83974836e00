// Lineage: the whole tree of candidates (cytoscape.js, laid out by dagre), coloured by score.
"use strict";
(() => {
  const {getJSON, candUrl, apiUrl, run, scoreColor} = ADRS;
  cytoscape.use(cytoscapeDagre);
  const cy = cytoscape({
    container: document.getElementById("tree"),
    style: [
      {selector: "node", style: {"background-color": "data(color)", label: "data(label)", "font-size": 10,
                                 "text-valign": "center", "text-halign": "center", width: 34, height: 34,
                                 "border-width": 1, "border-color": "#444", color: "#111"}},
      {selector: "node.failed", style: {shape: "round-rectangle"}},
      {selector: "node.rejected", style: {"border-color": "#d62728", "border-width": 3, "border-style": "dashed"}},
      {selector: "node.human", style: {shape: "star", width: 40, height: 40}},
      {selector: "node.seed", style: {shape: "diamond"}},
      {selector: "node.best", style: {"border-width": 5, "border-color": "#000"}},
      {selector: "edge", style: {width: 1.5, "line-color": "#999", "target-arrow-color": "#999",
                                 "target-arrow-shape": "triangle", "curve-style": "bezier"}},
    ],
  });
  window.adrsTree = cy;  // for the browser console (and the tests): cy.nodes().map(n => n.id())
  cy.on("tap", "node", (evt) => { location.href = candUrl(run, evt.target.id()); });
  const info = document.getElementById("tree-info");
  cy.on("mouseover", "node", (evt) => {
    const r = evt.target.data("row");
    info.textContent = `${r.id} · ${r.status}${r.flag ? ` (${r.flag})` : ""} · score ${ADRS.fmt(r.score)} · `
      + `held-out ${ADRS.fmt(r.heldout)} · ${r.author} · ${r.summary}${r.reason ? ` · ${r.reason}` : ""}`;
  });

  function band(rows) {
    const scores = rows.map((r) => r.score).filter((s) => s !== null);
    return scores.length ? [Math.min(...scores), Math.max(...scores)] : [0, 0];
  }

  function classes(r) { return [r.status, r.author, r.best ? "best" : ""].filter(Boolean).join(" "); }

  async function load() {
    const {rows} = await getJSON(apiUrl(run, "candidates"));
    const [lo, hi] = band(rows);
    let added = 0;
    cy.batch(() => {
      for (const r of rows) {
        const data = {id: r.id, label: `#${r.iteration}`, color: scoreColor(r.score, lo, hi), row: r};
        const node = cy.getElementById(r.id);
        if (node.empty()) { cy.add({group: "nodes", data, classes: classes(r)}); added++; }
        else { node.data(data); node.classes(classes(r)); }
      }
      for (const r of rows) {
        const id = `${r.parent}->${r.id}`;
        if (r.parent && cy.getElementById(id).empty() && !cy.getElementById(r.parent).empty()) {
          cy.add({group: "edges", data: {id, source: r.parent, target: r.id}});
        }
      }
    });
    if (added) {
      cy.layout({name: "dagre", rankDir: "TB", nodeSep: 18, rankSep: 45, animate: false, fit: true, padding: 20}).run();
      if (cy.zoom() > 1.2) { cy.zoom(1.2); cy.center(); }  // a small tree fitted to the box would be huge
    }
    document.getElementById("tree-count").textContent = `${rows.length} candidates.`;
  }
  ADRS.watch(run, load);
})();
