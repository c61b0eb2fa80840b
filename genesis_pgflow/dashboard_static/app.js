// The Genesis dashboard: polls /api/snapshot and draws it. No framework, no build step.
// Every string from the server is written as text (textContent, Text nodes, setAttribute),
// never parsed as markup: failure messages and payloads are chosen by whoever sent the request.
"use strict";

(() => {
  const POLL_MS = 3000;
  const SVG = "http://www.w3.org/2000/svg";
  const token = document.querySelector('meta[name="genesis-token"]').getAttribute("content") || "";

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = String(value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, String(value));
    }
    for (const child of children) {
      if (child !== undefined && child !== null) node.append(child);   // strings become Text nodes
    }
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    return node;
  }

  const show = (value) => (value === null || value === undefined || value === "" ? "-" : String(value));
  const time = (iso) => (iso ? iso.replace("T", " ").replace(/\.\d+/, "").replace("+00:00", "Z") : "-");
  const percent = (rate) => (typeof rate === "number" ? `${(rate * 100).toFixed(1)}%` : "-");

  function age(seconds) {
    if (typeof seconds !== "number") return "-";
    for (const [unit, size] of [["d", 86400], ["h", 3600], ["m", 60]]) {
      if (seconds >= size) return `${(seconds / size).toFixed(1)}${unit}`;
    }
    return `${seconds.toFixed(1)}s`;
  }

  // columns: [heading, (row) => text or node, class?]
  function table(columns, rows, empty, rowAttrs) {
    if (!rows.length) return el("p", { class: "empty", text: empty });
    const head = el("tr", {}, ...columns.map(([heading]) => el("th", { text: heading })));
    const body = rows.map((row) => el("tr", rowAttrs ? rowAttrs(row) : {}, ...columns.map(([, get, cls]) => {
      const value = get(row);
      return el("td", { class: cls }, value instanceof Node ? value : show(value));
    })));
    return el("table", {}, el("thead", {}, head), el("tbody", {}, ...body));
  }

  function chart(queue) {
    const width = 300, height = 70, n = queue.depth_series.length;
    const step = width / Math.max(n, 1);
    const done = queue.completed_series, failed = queue.failed_series;
    const runsMax = Math.max(1, ...done.map((c, i) => c + failed[i]));
    const depthMax = Math.max(1, ...queue.depth_series);
    const root = svg("svg", { class: "chart", viewBox: `0 0 ${width} ${height + 14}`, preserveAspectRatio: "none",
                              role: "img" });
    root.append(svg("line", { class: "grid", x1: 0, y1: height, x2: width, y2: height }));
    done.forEach((c, i) => {
      const hc = (c / runsMax) * height, hf = (failed[i] / runsMax) * height;
      if (c) root.append(svg("rect", { class: "completed", x: i * step + 0.5, y: height - hc, width: step - 1, height: hc }));
      if (failed[i]) {
        root.append(svg("rect", { class: "failed", x: i * step + 0.5, y: height - hc - hf, width: step - 1, height: hf }));
      }
    });
    const points = queue.depth_series.map((d, i) => `${(i + 0.5) * step},${height - (d / depthMax) * (height - 2)}`);
    root.append(svg("polyline", { class: "depth", points: points.join(" ") }));
    const label = svg("text", { x: 2, y: height + 12 });
    label.textContent = `-${n} min · depth max ${depthMax} · runs max ${runsMax}/min`;
    root.append(label);
    return root;
  }

  async function act(path, body, done) {
    try {
      const response = await fetch(path, {
        method: "POST", cache: "no-store", credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-Genesis-Token": token },
        body: JSON.stringify(body),
      });
      const answer = await response.json().catch(() => ({}));
      notice(response.ok ? done(answer) : `refused: ${answer.error || response.status}`, !response.ok);
    } catch (error) {
      notice(`failed: ${error}`, true);
    }
    refresh();
  }

  function notice(text, bad) {
    const node = document.getElementById("notice");
    node.textContent = text;
    node.className = bad ? "notice bad" : "notice";
    node.hidden = false;
  }

  function queueCard(name, q, actions) {
    const figures = el("div", { class: "figures" },
      ...[["depth", q.depth, "depth-now"], ["in flight", q.in_flight], ["oldest", age(q.oldest_age_s)],
          ["dead letters", q.dead_lettered, "dead-now"], ["results waiting", q.results_waiting],
          ["last hour", `${q.completed_series.reduce((a, b) => a + b, 0)} ok / ${q.failed_series.reduce((a, b) => a + b, 0)} failed`]]
        .map(([label, value, cls]) => el("span", {}, el("b", { class: cls, text: show(value) }), label)));
    const card = el("div", { class: "card", "data-queue": name },
      el("h3", { text: name }), el("div", { class: "muted", text: q.type }), figures, chart(q),
      el("div", { class: "legend" }, el("i", { class: "key-depth" }), "depth",
         el("i", { class: "key-completed" }), "completed", el("i", { class: "key-failed" }), "failed"));
    if (q.paused) card.querySelector("h3").append(" ", el("span", { class: "paused", text: "paused" }));
    if (actions.pause) {
      const verb = q.paused ? "resume" : "pause";
      card.append(el("button", { class: `${verb}-queue`, text: verb, onclick: () =>
        act(`/api/queues/${verb}`, { queue: name }, () => `${name}: ${verb}d`) }));
    }
    return card;
  }

  function render(s) {
    const where = s.database.embedded ? `embedded at ${s.database.path}` : s.database.dsn;
    document.getElementById("where").textContent = `${where} · served by ${s.served_by}`;
    const mode = document.getElementById("mode");
    mode.textContent = s.actions.requeue ? "actions enabled" : "read-only";
    mode.className = s.actions.requeue ? "badge actions" : "badge";
    document.getElementById("updated").textContent = `updated ${time(s.now)}`;

    document.getElementById("queues").replaceChildren(
      ...Object.entries(s.queues).map(([name, q]) => queueCard(name, q, s.actions)));

    document.getElementById("consumers").replaceChildren(table([
      ["id", (c) => c.id], ["state", (c) => el("span", { class: `state-${c.state}`, text: c.state })],
      ["version", (c) => c.version], ["parallel", (c) => c.parallel, "num"], ["in flight", (c) => c.in_flight, "num"],
      ["started", (c) => time(c.started_at)], ["heartbeat", (c) => `${age(c.heartbeat_age_s)} ago`],
      ["queues", (c) => (c.queues || []).join(", ")],
    ], s.consumers, "No consumer registered."));

    document.getElementById("failures").replaceChildren(table([
      ["finished", (f) => time(f.finished_at)], ["queue", (f) => f.queue], ["msg_id", (f) => f.msg_id, "num"],
      ["type", (f) => f.type], ["attempts", (f) => f.attempts, "num"], ["code", (f) => f.code, "code"],
      ["message", (f) => f.message, "text message"],
    ], s.failures, "No failure in the last 24 hours."));

    const letterColumns = [
      ["dead letter", (d) => `${d.queue} ${d.msg_id}`], ["since", (d) => time(d.enqueued_at)],
      ["original", (d) => `${d.original_queue} ${show(d.original_msg_id)}`], ["attempts", (d) => d.attempts, "num"],
      ["code", (d) => d.code, "code"], ["last error", (d) => d.message, "text message"], ["body", (d) => d.body, "text"],
    ];
    if (s.actions.requeue) {
      letterColumns.push(["", (d) => el("button", { class: "requeue", text: "requeue", onclick: () =>
        act("/api/dlq/requeue", { queue: d.original_queue, msg_id: d.msg_id },
            (a) => a.requeued.map((r) => `dead letter ${r.dead_letter} requeued as ${r.queue} ${r.msg_id}`).join("; ")) })]);
    }
    document.getElementById("dead-letters").replaceChildren(
      table(letterColumns, s.dead_letters, "No dead letter.", (d) => ({ "data-dead-letter": `${d.queue}:${d.msg_id}` })));

    document.getElementById("experiments").replaceChildren(table([
      ["experiment", (e) => e.experiment_id], ["type", (e) => e.experiment_type],
      ["status", (e) => el("span", { class: `status-${e.status}`, text: e.status })],
      ["recommendation", (e) => e.recommendation, "recommendation"], ["success", (e) => percent(e.success_rate), "num"],
      ["baseline", (e) => percent(e.baseline_success_rate), "num"],
      ["regression", (e) => (typeof e.regression === "number" ? e.regression.toFixed(3) : "-"), "num"],
      ["tests", (e) => e.test_count, "num"], ["failures", (e) => e.failures, "num"],
      ["duration", (e) => (typeof e.duration_ms === "number" ? age(e.duration_ms / 1000) : "-"), "num"],
      ["started", (e) => time(e.started_at)], ["description", (e) => e.error || e.description, "text"],
    ], s.experiments, "No experiment yet."));
  }

  let timer = null;
  async function refresh() {
    clearTimeout(timer);
    const problem = document.getElementById("problem");
    try {
      const response = await fetch("/api/snapshot", { cache: "no-store", credentials: "same-origin" });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      render(await response.json());
      problem.hidden = true;
      document.body.dataset.loaded = "yes";
    } catch (error) {
      problem.textContent = `cannot refresh: ${error.message}; showing the last figures`;
      problem.hidden = false;
    }
    timer = setTimeout(refresh, POLL_MS);
  }

  refresh();
})();
