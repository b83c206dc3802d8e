// ivp console: live alarms and fleet over server-sent events, ages that tick.
// No framework: the server renders every row; this only places them.
"use strict";
(function () {
  const body = document.body;
  if (!body.dataset.page) return; // login and error pages
  const baseTitle = body.dataset.title;
  const skew = Number(body.dataset.now) - Date.now() / 1000; // server clock minus ours
  const banner = document.getElementById("offline");
  const liveState = document.getElementById("live-state");

  function setOpen(n) {
    document.title = (n > 0 ? "(" + n + ") " : "") + baseTitle;
    for (const el of document.querySelectorAll("[data-open-count]")) {
      el.textContent = String(n);
      el.classList.toggle("hot", n > 0);
    }
  }

  function ago(s) {
    s = Math.max(0, s);
    if (s < 90) return Math.round(s) + " s";
    if (s < 5400) return Math.round(s / 60) + " min";
    if (s < 172800) return (s / 3600).toFixed(1) + " h";
    return (s / 86400).toFixed(1) + " d";
  }

  function tick() {
    const now = Date.now() / 1000 + skew;
    for (const el of document.querySelectorAll("[data-t]")) {
      el.textContent = ago(now - Number(el.dataset.t));
    }
  }
  setInterval(tick, 1000);

  function parseRow(html) {
    const t = document.createElement("template");
    t.innerHTML = html.trim();
    return t.content.firstElementChild;
  }

  function placeAlarm(data) {
    for (const feed of document.querySelectorAll("[data-alarm-feed]")) {
      const row = parseRow(data.html);
      row.dataset.shownAt = String(Date.now()); // when this page showed it (tests read it)
      const old = feed.querySelector("#alarm-" + data.id);
      if (old) {
        old.replaceWith(row);
      } else {
        row.classList.add("fresh");
        feed.prepend(row);
        const limit = Number(feed.dataset.limit || 500);
        while (feed.children.length > limit) feed.lastElementChild.remove();
      }
      const empty = feed.closest("table").parentElement.querySelector("[data-empty]");
      if (empty) empty.hidden = true;
    }
    setOpen(data.open);
    tick();
  }

  function say(text, bad) {
    liveState.textContent = text;
    banner.hidden = !bad;
    if (bad) banner.textContent = text;
  }

  const after = body.dataset.lastAlarm || "0";
  const source = new EventSource("/events?after=" + encodeURIComponent(after) +
                                 "&since=" + encodeURIComponent(body.dataset.now));
  source.addEventListener("alarm", (ev) => placeAlarm(JSON.parse(ev.data)));
  source.addEventListener("count", (ev) => setOpen(JSON.parse(ev.data).open));
  source.addEventListener("fleet", (ev) => {
    const tbody = document.getElementById("fleet-body");
    if (tbody) { tbody.innerHTML = JSON.parse(ev.data).html; tick(); }
  });
  source.addEventListener("trouble", (ev) => {
    say("The recomputer answered with an error: " + JSON.parse(ev.data).message, true);
  });
  source.onopen = () => say("connected", false);
  source.onerror = () => {
    const when = new Date().toLocaleTimeString();
    say("The recomputer is unreachable (since " + when + "): what this page shows may be " +
        "out of date. Retrying…", true);
  };
})();
