// Leaderboard: every candidate, sortable by any column, filtered by status, island, author and text.
"use strict";
(() => {
  const {el, clear, getJSON, fmt, candUrl, apiUrl, run, enc} = ADRS;
  const form = document.getElementById("filters");
  const tbody = document.querySelector("#board tbody");
  const state = {rows: [], key: "score", desc: true, ticked: new Set()};

  function why(r) { return r.status === "valid" ? r.summary : `${r.status === "rejected" ? "rejected" : r.category}: ${r.reason || ""} — ${r.summary}`; }

  function filtered() {
    const statuses = new Set([...form.querySelectorAll("input[name=status]:checked")].map((i) => i.value));
    const island = form.island.value, author = form.author.value, q = form.q.value.trim().toLowerCase();
    return state.rows.filter((r) => statuses.has(r.status) && (island === "" || String(r.island) === island)
      && (author === "" || r.author === author)
      && (!q || [r.id, r.summary, r.reason || "", r.category || "", r.model || ""].some((t) => t.toLowerCase().includes(q))));
  }

  function sorted(rows) {
    const {key, desc} = state;
    const val = (r) => (key === "summary" ? why(r) : r[key]);
    return [...rows].sort((a, b) => {
      const x = val(a), y = val(b);
      if (x === y) return a.iteration - b.iteration;
      if (x === null || x === undefined) return 1;  // missing values last, whichever the direction
      if (y === null || y === undefined) return -1;
      return (x < y ? -1 : 1) * (desc ? -1 : 1);
    });
  }

  function render() {
    const rows = sorted(filtered());
    clear(tbody).append(...rows.map((r) => el("tr", {class: `status-${r.status}${r.best ? " best" : ""}`, "data-id": r.id},
      el("td", {}, el("input", {type: "checkbox", class: "tick", checked: state.ticked.has(r.id),
                                onchange: (e) => (e.target.checked ? state.ticked.add(r.id) : state.ticked.delete(r.id))})),
      el("td", {}, el("a", {href: candUrl(run, r.id)}, r.id), r.best ? " ★" : ""),
      el("td", {class: "num"}, r.iteration), el("td", {class: "num"}, r.island),
      el("td", {}, r.flag ? `${r.status} (${r.flag})` : r.status),
      el("td", {class: "num"}, fmt(r.score)), el("td", {class: "num"}, fmt(r.heldout)),
      el("td", {class: "num"}, fmt(r.faithful)), el("td", {class: "num"}, fmt(r.error, 4)),
      el("td", {class: "num"}, fmt(r.density, 4)), el("td", {}, r.author),
      el("td", {class: "text"}, why(r)))));
    document.getElementById("count").textContent = `${rows.length} of ${state.rows.length}`;
    for (const th of document.querySelectorAll("#board th[data-key]")) {
      th.classList.toggle("sorted", th.dataset.key === state.key);
      th.dataset.dir = th.dataset.key === state.key ? (state.desc ? "desc" : "asc") : "";
    }
  }

  function options(select, values) {
    const keep = select.value;
    clear(select).append(el("option", {value: ""}, "all"), ...values.map((v) => el("option", {value: v}, v)));
    select.value = values.map(String).includes(keep) ? keep : "";
  }

  for (const th of document.querySelectorAll("#board th[data-key]")) {
    th.addEventListener("click", () => {
      state.desc = state.key === th.dataset.key ? !state.desc : th.hasAttribute("data-num");
      state.key = th.dataset.key;
      render();
    });
  }
  form.addEventListener("input", render);
  form.addEventListener("submit", (e) => e.preventDefault());
  document.getElementById("compare-cands").addEventListener("click", () => {
    const picked = [...state.ticked].map((id) => `c=${enc(run)}:${enc(id)}`);
    if (picked.length) location.href = `/compare?${picked.join("&")}`;
  });

  ADRS.watch(run, async () => {
    try {
      const data = await getJSON(apiUrl(run, "candidates"));
      state.rows = data.rows;
      options(form.island, [...new Set(data.rows.map((r) => r.island))].sort((a, b) => a - b));
      options(form.author, [...new Set(data.rows.map((r) => r.author))].sort());
      render();
    } catch (err) {
      clear(tbody).append(el("tr", {}, el("td", {colspan: 12, class: "error"}, `error: ${err.message}`)));
    }
  });
})();
