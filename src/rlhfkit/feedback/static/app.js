// rlhfkit feedback: drag-to-rank, keyboard ranking, pairwise shortcuts and draft autosave.
// Progressive enhancement: without this file every task page still works as a plain form.
(function () {
  "use strict";
  const form = document.getElementById("task-form");
  if (!form) return;
  const task = form.dataset.task;
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const draftStatus = document.getElementById("draft-status");
  const selects = Array.from(form.querySelectorAll("select[data-cid]"));
  const field = (name) => form.elements.namedItem(name);

  // ---------------------------------------------------------------- draft autosave
  let timer = null;
  function collectDraft() {
    const ranks = {};
    selects.forEach((s) => { ranks[s.dataset.cid] = s.value ? Number(s.value) : null; });
    return {
      ranks: ranks,
      unusable: !!(field("unusable") && field("unusable").checked),
      comment: field("comment") ? field("comment").value : "",
      response: field("response") ? field("response").value : "",
    };
  }
  function saveDraft() {
    fetch(form.dataset.draftUrl, {
      method: "PUT",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify(collectDraft()),
    }).then((r) => {
      draftStatus.textContent = r.ok ? "Draft saved" : "Draft not saved (" + r.status + ")";
    }).catch(() => { draftStatus.textContent = "Offline: draft not saved yet"; });
  }
  function scheduleSave() {
    draftStatus.textContent = "Saving draft…";
    clearTimeout(timer);
    timer = setTimeout(saveDraft, 400);
  }
  form.addEventListener("input", scheduleSave);
  form.addEventListener("change", scheduleSave);

  // ---------------------------------------------------------------- submit
  // Ranks are relative: rows left empty in between are closed up (1, 3 -> 1, 2) before sending.
  function compactRanks() {
    const used = Array.from(new Set(selects.filter((s) => s.value).map((s) => Number(s.value))))
      .sort((a, b) => a - b);
    selects.forEach((s) => { if (s.value) s.value = String(used.indexOf(Number(s.value)) + 1); });
  }
  let submitting = false;
  form.addEventListener("submit", (e) => {
    const unusable = field("unusable") && field("unusable").checked;
    if (task === "ranking" && !unusable && selects.some((s) => !s.value)) {
      e.preventDefault();
      showSummary("Give every response a rank first (or tick “Not rankable / all bad”).", true);
      return;
    }
    if (submitting) { e.preventDefault(); return; }  // a double click sends once (the server is idempotent too)
    submitting = true;
    clearTimeout(timer);
    if (task === "ranking") compactRanks();
  });

  const summary = document.getElementById("summary");
  function showSummary(text, warn) {
    if (!summary) return;
    summary.textContent = text;
    summary.classList.toggle("warn", !!warn);
  }

  // ---------------------------------------------------------------- ranking board
  if (task === "ranking") {
    const board = document.getElementById("board");
    const holder = document.getElementById("cards");
    const cards = Array.from(holder.querySelectorAll(".candidate"));
    const lanes = Array.from(board.querySelectorAll(".lane"));
    const k = Number(form.dataset.k);
    cards.forEach((c, i) => { c.dataset.index = String(i); });
    const selectOf = (card) => card.querySelector("select");
    const laneCards = (rank) => board.querySelector('.lane[data-rank="' + (rank || "") + '"] .lane-cards');

    function place(card) {
      const target = laneCards(selectOf(card).value);
      const after = Array.from(target.children).find((c) => Number(c.dataset.index) > Number(card.dataset.index));
      target.insertBefore(card, after || null);
    }
    function refresh() {
      const groups = new Map();
      let unranked = 0;
      cards.forEach((c) => {
        const r = selectOf(c).value;
        if (!r) { unranked += 1; return; }
        if (!groups.has(r)) groups.set(r, []);
        groups.get(r).push(c.dataset.label);
      });
      const order = Array.from(groups.keys()).sort((a, b) => a - b).map((r) => groups.get(r).join(" = "));
      let text = order.length ? "Your ranking: " + order.join("  ›  ") : "Nothing ranked yet.";
      if (unranked) text += " · " + unranked + " unranked";
      showSummary(text, false);
      lanes.forEach((l) => l.classList.toggle("filled", l.querySelector(".candidate") !== null));
    }
    function setRank(card, rank) {
      selectOf(card).value = rank ? String(rank) : "";
      place(card);
      refresh();
      scheduleSave();
      card.focus();
    }

    cards.forEach(place);
    holder.remove();
    board.hidden = false;
    refresh();

    // Mouse: drag a card onto a row; dropping onto a row that has cards makes a tie.
    let dragged = null;
    cards.forEach((card) => {
      card.addEventListener("dragstart", (e) => {
        dragged = card;
        card.classList.add("dragging");
        e.dataTransfer.effectAllowed = "move";
        e.dataTransfer.setData("text/plain", card.dataset.cid);
      });
      card.addEventListener("dragend", () => {
        card.classList.remove("dragging");
        dragged = null;
        lanes.forEach((l) => l.classList.remove("over"));
      });
      selectOf(card).addEventListener("change", () => { place(card); refresh(); card.focus(); });
    });
    lanes.forEach((lane) => {
      lane.addEventListener("dragover", (e) => { e.preventDefault(); lane.classList.add("over"); });
      lane.addEventListener("dragleave", () => lane.classList.remove("over"));
      lane.addEventListener("drop", (e) => {
        e.preventDefault();
        lane.classList.remove("over");
        const cid = e.dataTransfer.getData("text/plain");
        const card = cards.find((c) => c.dataset.cid === cid) || dragged;
        if (card) setRank(card, lane.dataset.rank);
      });
    });

    // Keyboard: arrows move between cards, a digit ranks the focused card, 0 unranks it.
    document.addEventListener("keydown", (e) => {
      if (e.ctrlKey || e.metaKey || e.altKey || e.target.closest("textarea, input, select, button, a")) return;
      const visual = Array.from(board.querySelectorAll(".candidate"));
      const current = e.target.closest ? e.target.closest(".candidate") : null;
      if (e.key === "ArrowDown" || e.key === "ArrowUp" || e.key === "j" || e.key === "k") {
        e.preventDefault();
        const step = (e.key === "ArrowDown" || e.key === "j") ? 1 : -1;
        const i = current ? visual.indexOf(current) : -1;
        visual[Math.min(visual.length - 1, Math.max(0, i + step))].focus();
      } else if (/^[0-9]$/.test(e.key)) {
        const rank = Number(e.key);
        const card = current || visual[0];
        if (rank > k) return;
        e.preventDefault();
        setRank(card, rank || "");
        if (rank) {  // move on to the next response still without a rank, in display order
          const next = cards.find((c) => !selectOf(c).value);
          if (next) next.focus();
        }
      } else if (e.key === "Enter") {
        e.preventDefault();
        form.requestSubmit();
      }
    });
  }

  // ---------------------------------------------------------------- pairwise quick mode
  if (task === "pairwise") {
    const keys = { "1": "a", "a": "a", "2": "b", "b": "b", "3": "tie", "t": "tie", "4": "both_bad", "x": "both_bad" };
    document.addEventListener("keydown", (e) => {
      if (e.ctrlKey || e.metaKey || e.altKey || e.target.closest("textarea, input, select")) return;
      const choice = keys[e.key.toLowerCase()];
      if (!choice) return;
      e.preventDefault();
      form.requestSubmit(form.querySelector('button[name="choice"][value="' + choice + '"]'));
    });
  }

  // ---------------------------------------------------------------- demonstrations
  if (task === "demonstration") {
    document.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); form.requestSubmit(); }
    });
  }
})();
