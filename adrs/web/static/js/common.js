// Shared helpers. Every string that came from a run is put in the page with textContent
// (never innerHTML): code, errors, summaries, prompts and notes are data, not markup.
"use strict";
const ADRS = (() => {
  const meta = (name) => document.querySelector(`meta[name="${name}"]`).content;
  const token = meta("adrs-token");
  const header = meta("adrs-header");
  const body = document.body.dataset;

  // el("a", {href: "/x", class: "y"}, "text", child): attributes as given, strings as text nodes.
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key.startsWith("on") && typeof value === "function") node.addEventListener(key.slice(2), value);
      else if (key === "text") node.textContent = String(value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); return node; }

  async function getJSON(url) {
    const response = await fetch(url, {headers: {[header]: token}, cache: "no-store"});
    const data = await response.json().catch(() => ({error: response.statusText}));
    if (!response.ok) throw new Error(data.error || `${response.status} ${response.statusText}`);
    return data;
  }

  // Reviews are the only writes: the token goes in a header, which no other site can set.
  async function postJSON(url, payload) {
    const response = await fetch(url, {
      method: "POST", cache: "no-store",
      headers: {[header]: token, "Content-Type": "application/json"}, body: JSON.stringify(payload),
    });
    const data = await response.json().catch(() => ({error: response.statusText}));
    if (!response.ok) throw new Error(data.error || `${response.status} ${response.statusText}`);
    return data;
  }

  const fmt = (x, digits = 5) => (x === null || x === undefined ? "-" : Number(x).toFixed(digits));
  const enc = encodeURIComponent;
  const candUrl = (run, id) => `/run/${enc(run)}/c/${enc(id)}`;
  const apiUrl = (run, path) => `/api/run/${enc(run)}/${path}`;

  // Calls onChange() now and whenever the run's version moves (a candidate, note or tag landed).
  function watch(run, onChange, intervalMs = 1500) {
    let seen = null;
    const live = document.getElementById("live");
    async function tick() {
      try {
        const {version} = await getJSON(apiUrl(run, "version"));
        if (version !== seen) {
          seen = version;
          await onChange(version);
          if (live) live.textContent = `live · v${version} · ${new Date().toLocaleTimeString()}`;
        }
        if (live) live.classList.remove("down");
      } catch (err) {
        if (live) { live.textContent = `offline: ${err.message}`; live.classList.add("down"); }
      }
      setTimeout(tick, intervalMs);
    }
    tick();
  }

  // Red (low) to green (high) on the run's score band; grey without a score.
  function scoreColor(score, lo, hi) {
    if (score === null || score === undefined) return "#b0b0b0";
    const t = hi > lo ? Math.min(1, Math.max(0, (score - lo) / (hi - lo))) : 1;
    return `hsl(${Math.round(120 * t)}, 65%, 48%)`;
  }

  // The running best valid score against iteration, one point per candidate from the first valid one.
  function bestSoFar(rows) {
    const out = [];
    let running = null;
    for (const r of rows) {
      if (r.status === "valid" && r.score !== null && (running === null || r.score > running)) running = r.score;
      if (running !== null) out.push({x: r.iteration, y: running});
    }
    return out;
  }

  function error(container, err) {
    clear(container).append(el("p", {class: "error"}, `error: ${err.message || err}`));
  }

  return {el, clear, getJSON, postJSON, fmt, enc, candUrl, apiUrl, watch, scoreColor, bestSoFar, error, run: body.run,
          cand: body.cand};
})();
