// Conductor's operations dashboard: fetches /dashboard/data/ and draws the five charts with uPlot.
// Exposes window.conductorDashboard = {data, charts} so tests (and curious operators) can compare
// what is drawn with what the endpoint said.
(function () {
  "use strict";
  const root = document.getElementById("dashboard");
  const statusLine = document.getElementById("status");
  const windowSelect = document.getElementById("window");
  const prioritySelect = document.getElementById("priority");
  const REFRESH_MS = 30000;
  const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
  const state = { data: null, charts: {}, renders: 0 };
  window.conductorDashboard = state;

  const percent = (v) => (v == null ? "–" : (100 * v).toFixed(1) + " %");
  const seconds = (v) => (v == null ? "–" : v < 1 ? (1000 * v).toFixed(0) + " ms" : v.toFixed(v < 10 ? 2 : 0) + " s");
  const count = (v) => (v == null ? "–" : String(v));
  const duration = (v) =>
    v == null ? "–" : v < 120 ? v.toFixed(v < 10 ? 1 : 0) + " s" : v < 7200 ? (v / 60).toFixed(0) + " min" :
    v < 172800 ? (v / 3600).toFixed(0) + " h" : (v / 86400).toFixed(0) + " d";

  // Each chart: its series as [label, values] pairs taken from the endpoint's JSON.
  const CHARTS = {
    delivery_rate: {
      series: (d) => Object.entries(d.delivery_rate),
      value: percent,
      axis: (u, ticks) => ticks.map((v) => (100 * v).toFixed(0) + "%"),
      range: [0, 1],
    },
    latency: {
      series: (d) => [
        ...Object.entries(d.latency.dispatch).map(([q, v]) => ["dispatch " + q, v]),
        ...Object.entries(d.latency.delivery).map(([q, v]) => ["delivery " + q, v]),
      ],
      value: seconds,
      axis: (u, ticks) => ticks.map((v) => seconds(v)),
      dash: (label) => (label.startsWith("delivery") ? [6, 4] : undefined),
    },
    queue_depth: { series: (d) => Object.entries(d.queue_depth), value: count, bars: false },
    dead_letters: { series: (d) => Object.entries(d.dead_letters), value: count },
    error_rate: {
      series: (d) => Object.entries(d.error_rate),
      value: percent,
      axis: (u, ticks) => ticks.map((v) => (100 * v).toFixed(1) + "%"),
    },
  };

  function draw(name, spec, data) {
    const target = document.getElementById("chart-" + name);
    const pairs = spec.series(data);
    const plotData = [data.times, ...pairs.map(([, values]) => values)];
    const options = {
      width: Math.max(320, target.clientWidth || 560),
      height: 240,
      scales: { x: { time: true }, y: spec.range ? { range: spec.range } : { auto: true } },
      axes: [{}, { values: spec.axis || undefined, size: 64 }],
      series: [
        {},
        ...pairs.map(([label], i) => ({
          label: label,
          stroke: PALETTE[i % PALETTE.length],
          width: 1.5,
          spanGaps: false,
          dash: spec.dash ? spec.dash(label) : undefined,
          value: (u, v) => spec.value(v),
        })),
      ],
    };
    if (state.charts[name]) state.charts[name].destroy();
    target.innerHTML = "";
    state.charts[name] = new uPlot(options, plotData, target);
    target.dataset.series = String(pairs.length);
  }

  function cell(text, className) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    return td;
  }

  function fillTable(id, rows, columns) {
    const body = document.querySelector("#" + id + " tbody");
    body.innerHTML = "";
    if (!rows.length) {
      const tr = document.createElement("tr");
      const td = cell("None.");
      td.colSpan = columns;
      tr.appendChild(td);
      body.appendChild(tr);
      return;
    }
    for (const cells of rows) {
      const tr = document.createElement("tr");
      cells.forEach((c) => tr.appendChild(c));
      body.appendChild(tr);
    }
  }

  function drawTables(d) {
    fillTable(
      "circuits",
      d.circuits.map((c) => [
        cell(c.provider),
        cell(c.state.replace("_", " ") + (c.failing_open ? " (state unreadable: failing open)" : ""), "state-" + c.state),
        cell(percent(c.failure_rate)),
        cell(count(c.times_opened)),
      ]),
      4
    );
    fillTable(
      "alerts",
      d.alerts.map((a) => [
        cell(new Date(a.opened_at).toLocaleString()),
        cell(a.kind + (a.error_type ? " (" + a.error_type + ")" : "")),
        cell(a.channel + " / " + a.provider + (a.country ? " to " + a.country : "")),
        cell(a.severity),
        cell(a.detail ? a.detail : a.observed.toFixed(3) + " / " + a.baseline.toFixed(3)),
      ]),
      5
    );
    const when = (iso) => new Date(iso).toLocaleString();
    const jobState = (j) =>
      (j.overdue ? "overdue" : j.running ? "running" : "ok") +
      (j.last_run_failed ? " · last run failed: " + j.last_error : "");
    fillTable(
      "periodic-jobs",
      d.periodic_jobs.map((j) => [
        cell(j.task + " (" + (j.queue || "default") + ")"),
        cell(duration(j.interval_seconds)),
        cell(j.last_success_at ? duration(j.age_seconds) + " ago" : "never"),
        cell(jobState(j), j.overdue ? "job-overdue" : j.last_run_failed ? "job-failed" : ""),
      ]),
      4
    );
    const weight = (w) => (w === null ? "" : " (weight " + w + ")");
    fillTable(
      "routes",
      d.routes.not_healthy.map((r) => [
        cell(r.provider), cell(r.country || "all"), cell(r.condition + weight(r.weight), "route-" + r.condition),
        cell(when(r.changed_at)), cell(r.source + " · " + r.reason),
      ]),
      5
    );
    fillTable(
      "routing-changes",
      d.routes.changes.map((c) => [
        cell(when(c.created_at)), cell(c.provider), cell(c.country || "all"),
        cell(c.from_condition + " → " + c.to_condition + (c.from_weight !== c.to_weight ? ", weight " + c.from_weight + " → " + c.to_weight : "")),
        cell(c.source + " · " + c.reason),
      ]),
      5
    );
    const cb = d.callbacks;
    document.getElementById("callbacks-summary").textContent =
      `${cb.pending} pending, ${cb.dead} dead (parked), ${cb.disabled_count} endpoints disabled.`;
    fillTable(
      "callback-backlog",
      cb.endpoints.map((e) => [
        cell("#" + e.endpoint_id + " " + e.url + (e.enabled ? "" : " (disabled)") + (e.failing_since ? " · failing" : "")),
        cell(e.client),
        cell(count(e.pending)),
        cell(count(e.due)),
        cell(seconds(e.oldest_age_seconds)),
        cell(seconds(e.oldest_due_wait_seconds)),
      ]),
      6
    );
    fillTable(
      "callback-disabled",
      cb.disabled.map((e) => [
        cell("#" + e.endpoint_id + " " + e.url),
        cell(e.client),
        cell(e.disabled_at ? new Date(e.disabled_at).toLocaleString() : "–"),
        cell(e.disabled_reason),
      ]),
      4
    );
    const sup = d.suppressed;
    document.getElementById("suppressed").textContent =
      `${count(sup.acceptance + sup.dispatch)} messages refused in the window: ` +
      `${count(sup.acceptance)} at acceptance, ${count(sup.dispatch)} at dispatch.`;
    const run = d.last_reconciliation;
    document.getElementById("reconciliation").textContent = run
      ? `${run.status} (${run.trigger}), ${new Date(run.started_at).toLocaleString()}: checked ${run.checked}, ` +
        `looked up ${run.looked_up}, updated ${run.updated}, still unknown ${run.still_unknown}` +
        (run.duration_ms != null ? `, ${run.duration_ms} ms` : "")
      : "None yet.";
  }

  async function load() {
    const params = new URLSearchParams({ window: windowSelect.value, priority: prioritySelect.value });
    statusLine.classList.remove("error");
    statusLine.textContent = "Loading…";
    try {
      const response = await fetch(root.dataset.url + "?" + params, { credentials: "same-origin" });
      if (!response.ok) throw new Error("the data endpoint answered " + response.status);
      const data = await response.json();
      state.data = data;
      for (const [name, spec] of Object.entries(CHARTS)) draw(name, spec, data);
      drawTables(data);
      state.renders += 1;
      root.dataset.rendered = data.window + ":" + state.renders;
      statusLine.textContent = "Updated " + new Date(data.generated_at).toLocaleTimeString() + " · step " + data.step_seconds + " s";
    } catch (error) {
      statusLine.classList.add("error");
      statusLine.textContent = "Could not load the data: " + error.message + ". Retrying in 30 s.";
    }
  }

  windowSelect.addEventListener("change", load);
  prioritySelect.addEventListener("change", load);
  load();
  setInterval(load, REFRESH_MS);
})();
