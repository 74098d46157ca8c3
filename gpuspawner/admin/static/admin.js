// GPU allocations page: refreshes the server-rendered page from the JSON API every few
// seconds, sorts and filters tables, shows a device's details, and sends the two actions.
// Everything that comes from the server is put in the page with textContent or as an
// attribute value, never as HTML, so a user name cannot become markup.
(function () {
  "use strict";
  const body = document.body;
  const prefix = body.dataset.prefix;
  const xsrf = body.dataset.xsrf;
  const canAct = body.dataset.canAct === "true";
  const refresh = Math.max(1, parseFloat(body.dataset.refresh || "5")) * 1000;
  const pageName = body.dataset.page;
  const severalHosts = body.dataset.hosts === "true";

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "text") node.textContent = value;
      else if (key === "cls") node.className = value;
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function pad(n) { return String(n).padStart(2, "0"); }

  function fmtTime(iso) {
    if (!iso) return "";
    const when = new Date(iso);
    if (isNaN(when)) return iso;
    const local = `${when.getFullYear()}-${pad(when.getMonth() + 1)}-${pad(when.getDate())} ` +
      `${pad(when.getHours())}:${pad(when.getMinutes())}`;
    const ago = (Date.now() - when.getTime()) / 1000;
    let rel;
    if (ago < -60) rel = "in " + span(-ago);
    else if (ago < 60) rel = "just now";
    else rel = span(ago) + " ago";
    return `${local} (${rel})`;
  }

  function span(seconds) {
    if (seconds < 3600) return Math.round(seconds / 60) + " min";
    if (seconds < 172800) return (seconds / 3600).toFixed(1).replace(/\.0$/, "") + " h";
    return Math.round(seconds / 86400) + " d";
  }

  function timeCell(iso) {
    return el("td", { "data-sort": iso || "" },
      el("time", { datetime: iso || "", text: fmtTime(iso) }));
  }

  function clock(iso) {
    const when = new Date(iso);
    return isNaN(when) ? iso : `${pad(when.getHours())}:${pad(when.getMinutes())}`;
  }

  function localizeTimes(root) {
    for (const node of (root || document).querySelectorAll("time[datetime]")) {
      const iso = node.getAttribute("datetime");
      if (!iso) continue;
      node.textContent = node.dataset.format === "clock" ? "until " + clock(iso) : fmtTime(iso);
    }
  }

  function showMessage(text, kind) {
    const box = document.getElementById("message");
    box.textContent = text;
    box.className = `alert alert-${kind || "info"} py-2`;
  }

  function showStale(text) {
    const box = document.getElementById("stale");
    box.textContent = text || "";
    box.classList.toggle("d-none", !text);
  }

  async function getJSON(path) {
    const response = await fetch(prefix + path, {
      credentials: "same-origin",
      headers: { "X-XSRFToken": xsrf, Accept: "application/json" },
    });
    if (response.status === 403 || response.status === 401) {
      throw new Error("not allowed any more (logged out?): reload the page to log in again");
    }
    if (!response.ok) throw new Error(`${path} answered ${response.status}`);
    return response.json();
  }

  // ------------------------------------------------------------------ actions

  function actionForms(h) {
    const forms = [];
    if (!canAct) return forms;
    const hidden = (name, value) => el("input", { type: "hidden", name, value: value || "" });
    if (h.can_release) {
      forms.push(el("form", {
        method: "post", action: prefix + "api/release", cls: "action d-inline",
        "data-confirm": `Remove the stopped container ${h.container_name || h.container}? ` +
          "Its volumes are kept; the user's next start creates a new container.",
      }, hidden("_xsrf", xsrf), hidden("container", h.container_id), hidden("next", pageName),
      h.host ? hidden("host", h.host) : null,
      el("button", { type: "submit", cls: "btn btn-sm btn-outline-warning",
        text: "Release hold" })));
    }
    if (h.can_stop) {
      forms.push(el("form", {
        method: "post", action: prefix + "api/stop", cls: "action d-inline",
        "data-confirm": `Stop the server ${h.user}/${h.server || "(default)"}? ` +
          "Its container keeps its device for the user's hold time.",
      }, hidden("_xsrf", xsrf), hidden("user", h.user), hidden("server", h.server),
      hidden("next", pageName),
      el("button", { type: "submit", cls: "btn btn-sm btn-outline-danger",
        text: "Stop server" })));
    }
    return forms;
  }

  document.addEventListener("submit", async (event) => {
    const form = event.target;
    if (!(form instanceof HTMLFormElement) || !form.classList.contains("action")) return;
    event.preventDefault();
    if (form.dataset.confirm && !window.confirm(form.dataset.confirm)) return;
    for (const button of form.querySelectorAll("button")) button.disabled = true;
    try {
      const response = await fetch(form.action, {
        method: "POST",
        credentials: "same-origin",
        headers: { "X-XSRFToken": xsrf, Accept: "application/json" },
        body: new URLSearchParams(new FormData(form)),
      });
      let answer = {};
      try { answer = await response.json(); } catch (e) { answer = {}; }
      showMessage(answer.message || `${response.status} ${response.statusText}`,
        response.ok ? "success" : "danger");
    } catch (error) {
      showMessage(String(error), "danger");
    }
    await tick();
  });

  // ------------------------------------------------------------------ tables

  let sortKey = null;
  let sortDir = 1;

  function cellValue(row, index) {
    const cell = row.cells[index];
    if (!cell) return "";
    return cell.dataset.sort !== undefined ? cell.dataset.sort : cell.textContent.trim();
  }

  function applyTable() {
    const table = document.getElementById("table");
    if (!table) return;
    const tbody = table.tBodies[0];
    const heads = Array.from(table.tHead.rows[0].cells);
    const rows = Array.from(tbody.rows);
    if (sortKey !== null) {
      const index = heads.findIndex((th) => th.dataset.key === sortKey);
      if (index >= 0) {
        rows.sort((a, b) => {
          const x = cellValue(a, index);
          const y = cellValue(b, index);
          const nx = parseFloat(x);
          const ny = parseFloat(y);
          const both = !isNaN(nx) && !isNaN(ny) && /^[\d.+-]+$/.test(x) && /^[\d.+-]+$/.test(y);
          return (both ? nx - ny : x.localeCompare(y)) * sortDir;
        });
        for (const row of rows) tbody.append(row);
      }
      for (const th of heads) {
        if (th.dataset.key === sortKey) {
          th.setAttribute("aria-sort", sortDir > 0 ? "ascending" : "descending");
        } else th.removeAttribute("aria-sort");
      }
    }
    const filter = document.getElementById("filter");
    const query = filter ? filter.value.trim().toLowerCase() : "";
    let shown = 0;
    for (const row of rows) {
      const visible = !query || row.textContent.toLowerCase().includes(query);
      row.hidden = !visible;
      if (visible) shown += 1;
    }
    const counter = document.getElementById("shown");
    if (counter) counter.textContent = `${shown} of ${rows.length} containers`;
  }

  function setupTable() {
    const table = document.getElementById("table");
    if (!table) return;
    for (const th of table.tHead.rows[0].cells) {
      if (!th.dataset.key) continue;
      th.tabIndex = 0;
      const sortBy = () => {
        sortDir = sortKey === th.dataset.key ? -sortDir : 1;
        sortKey = th.dataset.key;
        applyTable();
      };
      th.addEventListener("click", sortBy);
      th.addEventListener("keydown", (e) => { if (e.key === "Enter") sortBy(); });
    }
    const filter = document.getElementById("filter");
    if (filter) filter.addEventListener("input", applyTable);
  }

  function replaceRows(rows) {
    const tbody = document.getElementById("table").tBodies[0];
    tbody.replaceChildren(...rows);
    applyTable();
  }

  function badge(state, text, title) {
    return el("span", { cls: `badge state-${state}`, title, text: text || state });
  }

  function allocationRow(r) {
    let devices = "CPU";
    if (r.slots && r.slots.length) devices = `${r.gpu_profile || ""} ${r.slots.join(", ")}`.trim();
    else if (r.gpu_count) devices = `count=${r.gpu_count}`;
    const state = el("td", {}, badge(r.state));
    if (r.hold_until && r.state === "held") {
      state.append(" ", el("small", { text: "until " + fmtTime(r.hold_until) }));
    }
    const who = el("td", { text: r.user || "—" });
    if (!r.managed) who.append(" ", el("span", { cls: "badge text-bg-dark", text: "unmanaged" }));
    return el("tr", { "data-container": r.container_id, "data-state": r.state },
      who,
      el("td", { text: r.server || "" }),
      severalHosts ? el("td", { cls: "host", text: r.host || "" }) : null,
      el("td", { text: r.profile || "" }),
      el("td", { title: (r.uuids || []).join(" "), text: devices }),
      state,
      el("td", { text: (r.ports || []).map(([n, p]) => `${n}=${p}`).join(" ") }),
      timeCell(r.created_at),
      timeCell(r.last_activity),
      el("td", { cls: "text-truncate container-name", title: r.container_id,
        text: r.container_name }),
      el("td", { cls: "text-nowrap" }, ...actionForms(r)));
  }

  function userRow(r) {
    const share = r.share === null || r.share === undefined ? 0 : r.share;
    const bar = el("div", { cls: "usage-bar" + (share > 1 ? " over" : ""),
      style: `width: ${Math.round(Math.min(1, share) * 100)}%` });
    const servers = el("td");
    for (const s of r.servers) {
      servers.append(badge(s.state,
        `${s.server || "(default)"} ${s.profile || ""} ${(s.slots || []).join(",")}` +
          (s.host ? ` on ${s.host}` : ""),
        s.container), " ");
    }
    const idle = el("td");
    if (r.idle) idle.append(el("span", { cls: "badge text-bg-warning", text: `idle ${r.idle_for}` }));
    return el("tr", { "data-user": r.user, "data-idle": r.idle ? "true" : "false" },
      el("td", { text: r.user }),
      el("td", { "data-sort": r.equivalents }, el("div", { cls: "usage" }, bar),
        `${r.equivalents} of ${r.limit === null ? "unlimited" : r.limit}`),
      el("td", { "data-sort": r.holding, text: r.holding }),
      servers,
      timeCell(r.last_activity),
      idle);
  }

  function eventRow(e) {
    const shown = new Set(["time", "event", "user", "server", "by"]);
    const details = Object.entries(e).filter(([k]) => !shown.has(k))
      .map(([k, v]) => `${k}=${typeof v === "string" ? v : JSON.stringify(v)}`).join(" ");
    return el("tr", { "data-event": e.event },
      timeCell(e.time),
      el("td", {}, el("code", { text: e.event || "?" })),
      el("td", { text: e.user || "" }),
      el("td", { text: e.server || "" }),
      el("td", { text: e.by || "" }),
      el("td", { cls: "details", text: details }));
  }

  function renderHealth(checks) {
    const list = document.getElementById("checks");
    list.replaceChildren(...checks.map((c) =>
      el("li", { cls: "list-group-item d-flex gap-3 align-items-baseline",
        "data-check": c.name, "data-status": c.status },
      el("span", { cls: `badge check-${c.status}`, text: c.status }),
      el("b", { text: c.name }), el("span", { text: c.message }))));
  }

  // ------------------------------------------------------------------ overview

  let blocks = new Map();
  let selected = null;

  function renderOverview(model) {
    blocks = new Map();
    document.getElementById("totals").replaceChildren(...(model.totals.length ? model.totals.map(
      (t) => el("span", { cls: "total", "data-profile": t.profile, "data-free": t.free,
        "data-total": t.total }, el("b", { text: t.profile }), ` ${t.free} free of ${t.total}`))
      : [el("span", { cls: "total", text: "no GPU devices" })]));
    document.getElementById("legend").replaceChildren(...model.counts.map(([state, words, n]) =>
      el("li", { "data-state": state }, el("span", { cls: `swatch state-${state}` }), words, " ",
        el("span", { cls: "count", text: n }))));
    document.getElementById("problems").replaceChildren(...model.problems.map(
      (p) => el("div", { cls: "alert alert-warning py-1", text: p })));
    const cards = model.cards.map((card) => {
      const name = card.index === null ? "" : `GPU ${card.index}`;
      const model = card.name + (card.mig ? " · MIG" : "");
      const meta = `${card.used}/${card.total} in use`;
      const slices = el("div", { cls: "slices" }, ...card.blocks.map((b) => {
        blocks.set(b.uuid, b);
        return el("button", { type: "button", cls: `slice state-${b.state}`,
          "data-state": b.state, "data-slot": b.slot, "data-uuid": b.uuid,
          style: `flex-grow: ${Number(b.slices) || 1}`, title: b.title },
        el("span", { cls: "slot" }, b.slot,
          b.slices > 1 ? el("small", { text: " " + b.profile }) : null),
        el("span", { cls: "who", text: b.label }),
        b.memory_percent === null || b.memory_percent === undefined ? null :
          el("span", { cls: "mem", "aria-hidden": "true" },
            el("span", { cls: "mem-bar", style: `width: ${Number(b.memory_percent)}%` })),
        b.activity ? el("span", { cls: "activity", text: b.activity }) : null,
        b.until && b.slices > 1 ? el("time", { cls: "until", "data-format": "clock", datetime: b.until,
          text: "until " + clock(b.until) }) : null);
      }));
      return el("article", { cls: "card gpu-card", "data-gpu": card.index === null ? "" :
        card.index, "data-uuid": card.uuid, "data-host": card.host || "" },
      el("header", { cls: "card-header" },
        card.host ? el("span", { cls: "gpu-host", text: card.host }) : null,
        el("span", { cls: "gpu-name", text: name }),
        el("span", { cls: "gpu-model", text: model }),
        el("span", { cls: "gpu-meta", text: meta })),
      slices,
      card.note ? el("p", { cls: "note", text: card.note }) : null);
    });
    document.getElementById("cards").replaceChildren(...cards);
    showDetail(selected);
  }

  function showDetail(uuid) {
    const panel = document.getElementById("detail");
    const block = uuid ? blocks.get(uuid) : null;
    for (const node of document.querySelectorAll(".slice.selected")) {
      node.classList.remove("selected");
    }
    if (!block) {
      panel.classList.add("d-none");
      selected = null;
      return;
    }
    selected = uuid;
    const node = document.querySelector(`.slice[data-uuid="${CSS.escape(uuid)}"]`);
    if (node) node.classList.add("selected");
    document.getElementById("detail-title").textContent = `${block.slot} · ${block.profile}`;
    const parts = [el("pre", { text: block.title })];
    for (const h of block.holders) {
      const forms = actionForms(h);
      if (forms.length) parts.push(el("div", { cls: "mb-2" }, ...forms));
    }
    document.getElementById("detail-body").replaceChildren(...parts);
    panel.classList.remove("d-none");
  }

  function setupOverview() {
    const initial = document.getElementById("initial");
    if (initial) {
      for (const card of JSON.parse(initial.textContent).cards) {
        for (const b of card.blocks) blocks.set(b.uuid, b);
      }
    }
    document.getElementById("cards").addEventListener("click", (event) => {
      const slice = event.target.closest(".slice");
      if (slice) showDetail(slice.dataset.uuid === selected ? null : slice.dataset.uuid);
    });
    document.getElementById("detail-close").addEventListener("click", () => showDetail(null));
  }

  // ------------------------------------------------------------------ polling

  const pages = {
    overview: ["api/overview", renderOverview],
    allocations: ["api/allocations", (rows) => replaceRows(rows.map(allocationRow))],
    users: ["api/users", (rows) => replaceRows(rows.map(userRow))],
    events: ["api/events?limit=500", (rows) => replaceRows(rows.slice().reverse().map(eventRow))],
    health: ["api/health", renderHealth],
  };

  let busy = false;
  async function tick() {
    const entry = pages[pageName];
    if (!entry || busy) return;
    busy = true;
    try {
      entry[1](await getJSON(entry[0]));
      const now = new Date();
      document.getElementById("updated").textContent =
        `${pad(now.getHours())}:${pad(now.getMinutes())}:${pad(now.getSeconds())}`;
      showStale("");
      body.dataset.refreshed = String(Date.now());
    } catch (error) {
      showStale(`Could not refresh: ${error.message}`);
    } finally {
      busy = false;
    }
  }

  if (pageName === "overview") setupOverview();
  setupTable();
  applyTable();
  localizeTimes();
  setInterval(() => { if (!document.hidden) tick(); }, refresh);
  document.addEventListener("visibilitychange", () => { if (!document.hidden) tick(); });
})();
