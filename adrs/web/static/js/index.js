// The runs served, with their best candidate; tick runs to compare them.
"use strict";
(() => {
  const {el, clear, getJSON, fmt, candUrl, enc} = ADRS;
  const tbody = document.querySelector("#runs tbody");
  async function load() {
    try {
      const runs = await getJSON("/api/runs");
      const ticked = new Set([...tbody.querySelectorAll("input:checked")].map((i) => i.value));
      clear(tbody).append(...runs.map((r) => el("tr", {},
        el("td", {}, el("input", {type: "checkbox", value: r.key, checked: ticked.has(r.key)})),
        el("td", {}, el("a", {href: `/run/${enc(r.key)}`}, r.key)), el("td", {}, r.path),
        el("td", {class: "num"}, r.candidates),
        el("td", {}, r.best ? el("a", {href: candUrl(r.key, r.best.id)}, r.best.id) : "-"),
        el("td", {class: "num"}, fmt(r.best && r.best.score)))));
    } catch (err) {
      clear(tbody).append(el("tr", {}, el("td", {colspan: 6, class: "error"}, `error: ${err.message}`)));
    }
  }
  document.getElementById("compare-runs").addEventListener("click", () => {
    const keys = [...tbody.querySelectorAll("input:checked")].map((i) => `run=${enc(i.value)}`);
    if (keys.length) location.href = `/compare?${keys.join("&")}`;
  });
  load();
  setInterval(load, 5000);
})();
