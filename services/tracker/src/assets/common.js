// What every page of the dashboard shares, the main one included: small helpers to build the
// page from the API's JSON, and what its banner says when the tracker is cut off from NATS (or
// unreachable). Every page loads it before its own script. The links between the pages and
// how the pages besides the main one refresh are in pages.js.
"use strict";
window.fleetcast = (() => {
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

  // The banner `node` (hidden by the style unless "shown"): what it says when the tracker is
  // cut off from NATS or unreachable, and since when what the page shows is old. The page tells
  // it how each refresh went.
  function banner(node) {
    let lastLive = null;
    function show(text) {
      node.textContent = text;
      node.classList.toggle("shown", text !== "");
      document.body.dataset.connected = text === "" ? "true" : "false";
    }
    function asOf() {
      return lastLive ? `what you see is as of ${lastLive.toISOString()}` : "nothing was seen live yet";
    }
    function unreachable(e) {
      show(`The tracker is unreachable (${e}); ${asOf()}.`);
    }
    return {
      // The tracker's `/health` answer, which a refresh starts with; null when the tracker
      // cannot be reached (the banner says so).
      async health() {
        try {
          return await fetch("health");
        } catch (e) {
          unreachable(e);
          return null;
        }
      },
      // The data just came from a tracker connected to NATS: nothing to say. Returns when.
      live() {
        lastLive = new Date();
        show("");
        return lastLive;
      },
      unreachable,
      unreadable(message) { show(`The tracker cannot be read (${message}); ${asOf()}.`); },
      cutOff(reason) {
        show(`The tracker is cut off from NATS (${reason}): it hears no agent and moves no rollout; ${asOf()}.`);
      },
    };
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

  return { el, table, duration, ago, bytes, banner, json };
})();
