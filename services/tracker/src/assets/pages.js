// What the dashboard's pages besides the main one share, on top of common.js (loaded before
// it): the links between the pages, the banner, and `live`, which keeps the page fresh and
// the banner up to date. The main page (dashboard.html) refreshes in its own way (it also says
// when its reads are refused) and has only a line of these links.
"use strict";
window.fleetcast.live = (() => {
  const { el, banner } = window.fleetcast;
  const PAGES = [["./", "fleet"], ["history", "history"], ["releases", "releases"], ["rollout", "rollouts"]];

  // The links and the banner, at the top of the page.
  const here = location.pathname.replace(/\/+$/, "").split("/").pop() || "./";
  const nav = el("nav", { class: "pages" }, ...PAGES.map(([href, name]) =>
    el("a", { href, "aria-current": href === here ? "page" : null }, name)));
  const bannerNode = el("div", { id: "banner", role: "alert" });
  document.body.prepend(nav);
  const title = document.querySelector("h1");
  (title || nav).after(bannerNode);
  const connection = banner(bannerNode);

  // Runs `load(connected)` now and every `period` ms, with the tracker's health: the page
  // says when the tracker is cut off from NATS (`load` is still called, with false, so the
  // page can show what it holds and skip what needs NATS) or unreachable. A `load` that
  // throws counts as the tracker being unreachable.
  function live(load, period) {
    async function refresh() {
      const health = await connection.health();
      if (!health) return;
      const reason = health.ok ? "" : (await health.text()).trim();
      try {
        await load(health.ok);
        document.body.dataset.loaded = "true";
      } catch (e) {
        connection.unreachable(e);
        return;
      }
      if (health.ok) {
        connection.live();
      } else {
        connection.cutOff(reason);
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

  return live;
})();
