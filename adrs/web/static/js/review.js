// The review panel: approve / reject / note a checkpoint, as `adrs review` does (same git tags).
"use strict";
ADRS.reviewPanel = function reviewPanel(container, run, checkpoints, onDone, emptyText) {
  const {el, clear, postJSON, candUrl} = ADRS;
  clear(container);
  if (!checkpoints.length) {
    container.append(el("p", {class: "hint"}, emptyText || "no checkpoints (config: review.every / review.on_new_best)"));
    return;
  }
  // The outcome of the last review stays on screen: onDone redraws this panel, which would
  // otherwise replace the line saying what was recorded with an empty one.
  const status = el("p", {class: "hint review-status", role: "status"}, container.dataset.reviewStatus || "");
  const say = (message) => {
    status.textContent = message;
    container.dataset.reviewStatus = message;
  };
  const rows = checkpoints.map((c) => {
    const text = el("input", {type: "text", class: "review-text", placeholder: "reason or note", size: 28});
    const send = async (action) => {
      say(`${action}: sending…`);
      try {
        const done = await postJSON(ADRS.apiUrl(run, "review"), {action, text: text.value, checkpoint: c.name});
        say(`${action} recorded on ${done.checkpoint.name}`);
        text.value = "";
        if (onDone) await onDone();
      } catch (err) {
        say(`${action} refused: ${err.message}`);
      }
    };
    const actions = el("td", {class: "actions"}, text,
      c.pending ? el("button", {type: "button", "data-action": "approve", onclick: () => send("approve")}, "Approve") : null,
      c.pending ? el("button", {type: "button", "data-action": "reject", onclick: () => send("reject")}, "Reject") : null,
      el("button", {type: "button", "data-action": "note", onclick: () => send("note")}, "Note"));
    return el("tr", {"data-checkpoint": c.name},
      el("td", {}, c.name), el("td", {}, el("a", {href: candUrl(run, c.candidate)}, c.candidate)),
      el("td", {}, c.reason),
      el("td", {class: c.pending ? "pending" : "decided"}, c.pending ? "pending" : c.decision),
      el("td", {class: "notes"}, c.notes.map((n) => el("div", {class: "note"}, n))), actions);
  });
  container.append(el("table", {class: "grid review"},
    el("thead", {}, el("tr", {}, ["checkpoint", "candidate", "why", "decision", "notes", ""].map((h) => el("th", {}, h)))),
    el("tbody", {}, rows)), status);
};
