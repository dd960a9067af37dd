// rlhfkit feedback: rank buttons and keyboard ranking, long responses folded, plain-text view,
// pairwise shortcuts (with strength of preference), score and thumbs keys, skip, and draft autosave.
// Progressive enhancement: without this file every task page still works as a plain form.
// The chat page: Ctrl+Enter sends; a send shows that the model is writing (it takes a while).
(function () {
  "use strict";
  const chat = document.getElementById("chat-form");
  if (!chat) return;
  const conversation = document.getElementById("conversation");
  if (conversation) conversation.lastElementChild.scrollIntoView({ block: "end" });
  chat.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); chat.requestSubmit(); }
  });
  chat.addEventListener("submit", () => {
    const send = document.getElementById("send");
    send.disabled = true;
    send.textContent = "The model is writing…";
  });
})();

(function () {
  "use strict";
  const form = document.getElementById("task-form");
  if (!form) return;
  const task = form.dataset.task;
  const k = Number(form.dataset.k);
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const draftStatus = document.getElementById("draft-status");
  const formError = document.getElementById("form-error");
  const topbar = document.querySelector(".topbar");
  const actionbar = document.getElementById("actionbar");
  const cards = Array.from(document.querySelectorAll(".candidate"));
  const rankFields = Array.from(form.querySelectorAll("input[data-cid]"));
  const scoreRows = Array.from(form.querySelectorAll(".score-row"));  // rating and thumbs: one per candidate and criterion
  const field = (name) => form.elements.namedItem(name);
  const rankField = (card) => card.querySelector("input[data-cid]");
  // Keys are shortcuts except while typing (a checked radio button keeps the focus: not typing).
  const typing = "textarea, select, input:not([type=radio]):not([type=checkbox])";

  // On a narrow screen the guidelines sit above the task: start them folded.
  const guidelines = document.getElementById("guidelines");
  if (guidelines && window.matchMedia("(max-width: 900px)").matches) guidelines.open = false;

  // Bring an element's top into the part of the window that the sticky bars leave free.
  function reveal(el) {
    const box = el.getBoundingClientRect();
    const top = topbar ? Math.max(0, topbar.getBoundingClientRect().bottom) : 0;
    const bottom = actionbar ? actionbar.getBoundingClientRect().top : window.innerHeight;
    if (box.top < top || box.top > bottom - 48) el.scrollIntoView({ block: "start" });
  }
  function focusCard(card) {
    card.focus({ preventScroll: true });
    reveal(card);
  }

  // ---------------------------------------------------------------- draft autosave
  let timer = null;
  const strengthChosen = () => {
    const checked = form.querySelector('input[name="strength"]:checked');
    return checked && checked.value ? Number(checked.value) : null;
  };
  function collectDraft() {
    const ranks = {};
    rankFields.forEach((f) => { ranks[f.dataset.cid] = /^\d+$/.test(f.value.trim()) ? Number(f.value) : null; });
    const scores = {};
    form.querySelectorAll("input[data-criterion]:checked").forEach((r) => {
      (scores[r.dataset.criterion] = scores[r.dataset.criterion] || {})[r.dataset.candidate] = Number(r.value);
    });
    return {
      scores: scores,
      ranks: ranks,
      unusable: !!(field("unusable") && field("unusable").checked),
      comment: field("comment") ? field("comment").value : "",
      response: field("response") ? field("response").value : "",
      strength: strengthChosen(),
    };
  }
  function saveDraft() {
    if (!form.dataset.draftUrl) return;  // editing a submitted judgment: nothing to autosave
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
    if (!form.dataset.draftUrl) return;
    draftStatus.textContent = "Saving draft…";
    clearTimeout(timer);
    timer = setTimeout(saveDraft, 400);
  }
  form.addEventListener("input", scheduleSave);
  form.addEventListener("change", scheduleSave);

  // ---------------------------------------------------------------- errors, beside the submit button
  function showError(text) {
    formError.textContent = text;
    formError.hidden = false;
  }
  function clearError() {
    formError.hidden = true;
    cards.forEach((c) => c.classList.remove("needs-rank"));
  }

  // ---------------------------------------------------------------- submit
  // Ranks are relative: numbers left out in between are closed up (1, 3 -> 1, 2) before sending.
  function compactRanks() {
    const used = Array.from(new Set(rankFields.filter((f) => f.value).map((f) => Number(f.value))))
      .sort((a, b) => a - b);
    rankFields.forEach((f) => { if (f.value) f.value = String(used.indexOf(Number(f.value)) + 1); });
  }
  let submitting = false;
  const skipButton = document.getElementById("skip");
  function skip() {  // the s key: the same as the Skip button
    if (skipButton) form.requestSubmit(skipButton);
  }
  form.addEventListener("submit", (e) => {
    if (submitting) { e.preventDefault(); return; }  // a double click sends once (the server is idempotent too)
    if (skipButton && e.submitter === skipButton) { submitting = true; clearTimeout(timer); return; }
    const unusable = field("unusable") && field("unusable").checked;
    if (scoreRows.length && !unusable) {
      const missing = scoreRows.filter((row) => !row.querySelector("input:checked"));
      if (missing.length) {
        e.preventDefault();
        clearError();
        const cardsMissing = Array.from(new Set(missing.map((row) => row.closest(".candidate"))));
        cardsMissing.forEach((c) => c.classList.add("needs-rank"));
        showError((task === "thumbs" ? "Give every response 👍 or 👎 first (" : "Score every response on every criterion first (") +
          cardsMissing.map((c) => c.dataset.label).join(", ") + " still missing), or tick “Cannot be judged”.");
        focusRow(missing[0]);
        return;
      }
    }
    if (task === "ranking" && !unusable) {
      const missing = cards.filter((c) => !/^[1-9]\d*$/.test(rankField(c).value.trim()));
      if (missing.length) {
        e.preventDefault();
        clearError();
        missing.forEach((c) => c.classList.add("needs-rank"));
        const names = missing.map((c) => c.dataset.label);
        showError("Give every response a rank first (" + (names.length > 5 ? names.length + " responses" :
          names.join(", ")) + " still without one), or tick “Not rankable / all bad”.");
        focusCard(missing[0]);
        return;
      }
    }
    submitting = true;
    clearTimeout(timer);
    if (task === "ranking") compactRanks();
  });

  // ---------------------------------------------------------------- long responses: fold and unfold
  const toggles = new Map();  // card -> its "Show all" button
  function setExpanded(card, expanded) {
    card.classList.toggle("expanded", expanded);
    const button = toggles.get(card);
    button.setAttribute("aria-expanded", String(expanded));
    button.textContent = expanded ? "Show less" : "Show all";
  }
  function toggleExpanded(card) {
    if (!toggles.has(card)) return;
    setExpanded(card, !card.classList.contains("expanded"));
    if (!card.classList.contains("expanded")) reveal(card);  // folding up can leave the window far below
  }
  function measureFolds() {  // a button only where the text is longer than the folded height
    cards.forEach((card) => {
      const body = card.querySelector(".card-body");
      const folded = !card.classList.contains("expanded");
      const long = folded ? body.scrollHeight > body.clientHeight + 4 : toggles.has(card);
      if (long && !toggles.has(card)) {
        const button = document.createElement("button");
        button.type = "button";
        button.className = "small expand";
        button.setAttribute("aria-controls", body.id);
        button.addEventListener("click", () => toggleExpanded(card));
        body.after(button);
        toggles.set(card, button);
        setExpanded(card, false);
      } else if (!long && toggles.has(card)) {
        toggles.get(card).remove();
        toggles.delete(card);
      }
      card.classList.toggle("foldable", toggles.has(card));
    });
  }
  document.documentElement.classList.add("js");  // folds long bodies (without JS they scroll)
  measureFolds();
  window.addEventListener("resize", () => { clearTimeout(measureFolds.t); measureFolds.t = setTimeout(measureFolds, 150); });

  // ---------------------------------------------------------------- plain text or formatted Markdown
  const plainToggle = document.getElementById("plain-toggle");
  function setPlain(on) {
    document.body.classList.toggle("show-raw", on);
    plainToggle.setAttribute("aria-pressed", String(on));
    try { localStorage.setItem("rlhfkit.plain", on ? "1" : ""); } catch (err) { /* private mode */ }
    measureFolds();
  }
  if (plainToggle) {
    plainToggle.hidden = false;
    plainToggle.addEventListener("click", () => setPlain(!document.body.classList.contains("show-raw")));
    let saved = "";
    try { saved = localStorage.getItem("rlhfkit.plain") || ""; } catch (err) { /* private mode */ }
    if (saved) setPlain(true);
  }

  // ---------------------------------------------------------------- ranking in place
  if (task === "ranking") {
    const summary = document.getElementById("summary");
    const quick = k <= 9;  // number buttons and digit keys; more candidates type into the box
    const buttons = new Map();  // card -> its rank buttons

    function refresh() {
      const groups = new Map();
      let unranked = 0;
      cards.forEach((c) => {
        const r = rankField(c).value.trim();
        c.classList.toggle("ranked", !!r);
        if (buttons.has(c)) buttons.get(c).forEach((b) => b.setAttribute("aria-pressed", String(b.dataset.rank === r)));
        if (!r) { unranked += 1; return; }
        if (!groups.has(r)) groups.set(r, []);
        groups.get(r).push(c.dataset.label);
      });
      const order = Array.from(groups.keys()).sort((a, b) => a - b).map((r) => groups.get(r).join(" = "));
      let text = order.length ? "Your ranking: " + order.join("  ›  ") : "Nothing ranked yet.";
      if (unranked) text += " · " + unranked + " unranked";
      summary.textContent = text;
    }
    function setRank(card, rank) {
      rankField(card).value = rank ? String(rank) : "";
      card.classList.remove("needs-rank");
      if (!cards.some((c) => c.classList.contains("needs-rank"))) clearError();
      refresh();
      scheduleSave();
    }

    if (quick) {
      cards.forEach((card) => {
        const group = document.createElement("div");
        group.className = "rank-buttons";
        group.setAttribute("role", "group");
        group.setAttribute("aria-label", "Rank of response " + card.dataset.label + " (1 = best)");
        const caption = document.createElement("span");
        caption.className = "muted";
        caption.textContent = "Rank";
        caption.setAttribute("aria-hidden", "true");
        group.appendChild(caption);
        const list = [];
        for (let r = 1; r <= k; r += 1) {
          const b = document.createElement("button");
          b.type = "button";
          b.textContent = String(r);
          b.dataset.rank = String(r);
          b.title = "Rank " + r + (r === 1 ? " (best)" : "") + " · key " + r;
          b.addEventListener("click", () => setRank(card, r));
          group.appendChild(b);
          list.push(b);
        }
        const clear = document.createElement("button");
        clear.type = "button";
        clear.className = "clear";
        clear.textContent = "×";
        clear.title = "No rank · key 0";
        clear.setAttribute("aria-label", "Clear the rank of response " + card.dataset.label);
        clear.addEventListener("click", () => setRank(card, ""));
        group.appendChild(clear);
        const label = rankField(card).closest("label");
        label.hidden = true;  // the buttons show and set the same field
        label.after(group);
        buttons.set(card, list);
      });
    }
    rankFields.forEach((f) => f.addEventListener("input", refresh));
    refresh();

    document.addEventListener("keydown", (e) => {
      if (e.ctrlKey || e.metaKey || e.altKey || e.target.closest(typing)) return;
      const current = e.target.closest(".candidate");
      if (e.key === "ArrowDown" || e.key === "ArrowUp" || e.key === "j" || e.key === "k") {
        e.preventDefault();
        const step = (e.key === "ArrowDown" || e.key === "j") ? 1 : -1;
        const i = current ? cards.indexOf(current) : -1;
        focusCard(cards[Math.min(cards.length - 1, Math.max(0, i + step))]);
      } else if (/^[0-9]$/.test(e.key)) {
        const card = current || cards[0];
        if (!quick) {  // the digit goes into the card's rank box and the labeler types on
          rankField(card).focus();
          rankField(card).select();
          return;
        }
        const rank = Number(e.key);
        if (rank > k) return;
        e.preventDefault();
        setRank(card, rank || "");
        if (rank) {  // move on to the next response still without a rank, in display order
          const next = cards.find((c) => !rankField(c).value);
          if (next) focusCard(next);
        }
      } else if (e.key === "e" && current) {
        e.preventDefault();
        toggleExpanded(current);
      } else if (e.key === "s") {
        e.preventDefault();
        skip();
      } else if (e.key === "Enter" && !e.target.closest("button, a, summary")) {
        e.preventDefault();
        form.requestSubmit();
      }
    });
  }

  // ---------------------------------------------------------------- pairwise quick mode
  if (task === "pairwise") {
    const keys = { "1": "a", "a": "a", "2": "b", "b": "b", "3": "tie", "t": "tie", "4": "both_bad", "x": "both_bad" };
    document.addEventListener("keydown", (e) => {
      if (e.ctrlKey || e.metaKey || e.altKey || e.target.closest(typing)) return;
      const current = e.target.closest(".candidate");
      if (e.key === "e" && current) {
        e.preventDefault();
        toggleExpanded(current);
        return;
      }
      if (e.key === "s") {
        e.preventDefault();
        skip();
        return;
      }
      const strength = form.querySelector('input[name="strength"][value="' + (Number(e.key) - 4) + '"]');
      if (/^[5-7]$/.test(e.key) && strength) {  // how much better: chosen before A or B
        e.preventDefault();
        strength.checked = true;
        strength.dispatchEvent(new Event("change", { bubbles: true }));
        return;
      }
      const choice = keys[e.key.toLowerCase()];
      if (!choice) return;
      e.preventDefault();
      form.requestSubmit(form.querySelector('button[name="choice"][value="' + choice + '"]'));
    });
  }

  // ---------------------------------------------------------------- ratings and thumbs
  // The unit the keys move between is a score row (one candidate on one criterion): its radio
  // buttons already work with Tab and the arrow keys; digits set the score and move on.
  function focusRow(row) {
    const target = row.querySelector("input:checked") || row.querySelector("input");
    target.focus({ preventScroll: true });
    reveal(row.closest(".candidate"));
  }
  if (scoreRows.length) {
    form.addEventListener("change", (e) => {
      const card = e.target.closest(".candidate");
      if (card && e.target.matches("input[data-criterion]")) {
        card.classList.toggle("ranked", Array.from(card.querySelectorAll(".score-row")).every((r) => r.querySelector("input:checked")));
        if (!Array.from(card.querySelectorAll(".score-row")).some((r) => !r.querySelector("input:checked"))) card.classList.remove("needs-rank");
      }
    });
    document.addEventListener("keydown", (e) => {
      if (e.ctrlKey || e.metaKey || e.altKey || e.target.closest("textarea, input:not([type=radio]):not([type=checkbox])")) return;
      const row = e.target.closest(".score-row");
      const current = e.target.closest(".candidate");
      if (e.key === "ArrowDown" || e.key === "ArrowUp" || e.key === "j" || e.key === "k") {
        if (row && (e.key === "ArrowDown" || e.key === "ArrowUp")) return;  // the radio group's own arrows
        e.preventDefault();
        const step = (e.key === "ArrowDown" || e.key === "j") ? 1 : -1;
        const i = row ? scoreRows.indexOf(row) : (current ? scoreRows.indexOf(current.querySelector(".score-row")) - 1 : -1);
        focusRow(scoreRows[Math.min(scoreRows.length - 1, Math.max(0, i + step))]);
      } else if (/^[0-9]$/.test(e.key)) {
        const target = row || (current ? current.querySelector(".score-row") : scoreRows[0]);
        const radio = target.querySelector('input[value="' + e.key + '"]');
        if (!radio) return;
        e.preventDefault();
        radio.checked = true;
        radio.dispatchEvent(new Event("change", { bubbles: true }));
        const next = scoreRows.slice(scoreRows.indexOf(target) + 1).find((r) => !r.querySelector("input:checked"));
        focusRow(next || target);
      } else if (e.key === "e" && current) {
        e.preventDefault();
        toggleExpanded(current);
      } else if (e.key === "s") {
        e.preventDefault();
        skip();
      } else if (e.key === "Enter" && !e.target.closest("button, a, summary")) {
        e.preventDefault();
        form.requestSubmit();
      }
    });
  }

  // ---------------------------------------------------------------- demonstrations
  if (task === "demonstration") {
    document.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); form.requestSubmit(); }
    });
  }
})();
