// What the dashboard's pages share: the links between them, the banner that says when the
// tracker is cut off from NATS (or unreachable) and since when the page's data is old, and
// small helpers to build the page. Every page loads it before its own script; the main page
// (dashboard.html) has its own copy of the banner logic and only a line of these links.
"use strict";
window.fleetcast = (() => {
  const PAGES = [["./", "fleet"], ["history", "history"], ["releases", "releases"], ["rollout", "rollouts"]];

  // Text only, never HTML from the API: app names, reasons and agent ids are untrusted.
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== undefined && v !== null && v !== false) node.setAttribute(k, v);
    }
    for (const c of children) {
      if (c === undefined || c === null) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }
  function table(headers, rows) {
    return el("table", {}, el("tr", {}, ...headers.map(h => el("th", {}, h))),
      ...rows.map(r => el("tr", r.attrs || {}, ...r.cells.map(c => el("td", {}, c)))));
  }
  // Ages as a person reads them; the exact time stays in the tooltip.
  function duration(s) {
    if (s < 120) return `${Math.max(0, Math.floor(s))}s`;
    if (s < 7200) return `${Math.floor(s / 60)}m`;
    if (s < 172800) return `${Math.floor(s / 3600)}h`;
    return `${Math.floor(s / 86400)}d`;
  }
  function ago(iso) {
    const s = (Date.now() - Date.parse(iso)) / 1000;
    return el("span", { class: "age", title: iso }, s < 1 ? "just now" : `${duration(s)} ago`);
  }
  function bytes(n) {
    if (n < 1024) return `${n} B`;
    const units = ["KiB", "MiB", "GiB", "TiB"];
    let v = n / 1024, i = 0;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return `${v.toFixed(v < 10 ? 1 : 0)} ${units[i]}`;
  }

  // The links and the banner, at the top of the page.
  const here = location.pathname.replace(/\/+$/, "").split("/").pop() || "./";
  const nav = el("nav", { class: "pages" }, ...PAGES.map(([href, name]) =>
    el("a", { href, "aria-current": href === here ? "page" : null }, name)));
  const banner = el("div", { id: "banner", role: "alert" });
  document.body.prepend(nav);
  const title = document.querySelector("h1");
  (title || nav).after(banner);

  let lastLive = null;
  function showBanner(text) {
    banner.textContent = text;
    banner.classList.toggle("shown", text !== "");
    document.body.dataset.connected = text === "" ? "true" : "false";
  }
  function asOf() {
    return lastLive ? `what you see is as of ${lastLive.toISOString()}` : "nothing was seen live yet";
  }

  // Runs `load(connected)` now and every `period` ms, with the tracker's health: the page
  // says when the tracker is cut off from NATS (`load` is still called, with false, so the
  // page can show what it holds and skip what needs NATS) or unreachable. A `load` that
  // throws counts as the tracker being unreachable.
  function live(load, period) {
    async function refresh() {
      let health;
      try {
        health = await fetch("health");
      } catch (e) {
        showBanner(`The tracker is unreachable (${e}); ${asOf()}.`);
        return;
      }
      const reason = health.ok ? "" : (await health.text()).trim();
      try {
        await load(health.ok);
        document.body.dataset.loaded = "true";
      } catch (e) {
        showBanner(`The tracker is unreachable (${e}); ${asOf()}.`);
        return;
      }
      if (health.ok) {
        lastLive = new Date();
        showBanner("");
      } else {
        showBanner(`The tracker is cut off from NATS (${reason}): it hears no agent and moves no rollout; ${asOf()}.`);
      }
    }
    // One refresh at a time; asked for during one (a filter changed), one more runs after it.
    let busy = null, again = false;
    function run() {
      if (busy) { again = true; return busy; }
      busy = refresh().finally(() => {
        busy = null;
        if (again) { again = false; run(); }
      });
      return busy;
    }
    run();
    setInterval(run, period);
    return run;
  }

  // `fetch` of a JSON API: the value, or an Error carrying the API's own message.
  async function json(url) {
    const r = await fetch(url);
    if (!r.ok) {
      const e = new Error((await r.text()).trim() || `${r.status}`);
      e.status = r.status;
      throw e;
    }
    return r.json();
  }

  return { el, table, duration, ago, bytes, live, json };
})();
