// comfy-dual status page: polls /api/board (what the daemon last published) and draws it.
// Plain DOM, no framework, no build step; every text from the server goes in as text.
"use strict";

const POLL_MS = 1000;
const GANTT_MS = 2000;
const KINDS = ["HIGH", "LOW", "COMBINE"];
let ganttVersion = 0;
let ganttAt = 0;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }
  return node;
}

function pct(value, max) {
  return max > 0 ? Math.max(0, Math.min(100, (100 * value) / max)) : 0;
}

function progressBar(progress) {
  if (!progress || !progress.max) return null;
  const inner = el("span");
  inner.style.width = pct(progress.value, progress.max).toFixed(1) + "%";
  return el("span", {class: "progress", title: `${progress.value}/${progress.max}`}, inner);
}

function ago(seconds) {
  if (seconds < 60) return `${seconds.toFixed(0)} s ago`;
  if (seconds < 3600) return `${(seconds / 60).toFixed(0)} min ago`;
  return `${(seconds / 3600).toFixed(1)} h ago`;
}

function drawSummary(board) {
  const status = board.status;
  const counts = Object.entries(status.counts).filter(([, n]) => n > 0)
    .map(([state, n]) => `${n} ${state}`).join(", ");
  const daemon = status.daemon ? `daemon pid ${status.daemon.pid}` : "daemon stopped";
  const when = new Date(board.updated_at * 1000).toLocaleTimeString();
  document.getElementById("summary").textContent =
    `${daemon} · ${status.batches.length} batches · jobs: ${counts || "none"} · as of ${when}`;
}

function drawInstances(status) {
  const body = document.querySelector("#instances tbody");
  const rows = status.instances.map((inst) => {
    const jobs = status.running.filter((job) => job.instance_id === inst.instance_id);
    const health = inst.up === true ? "up" : inst.up === false ? "down" : "unknown";
    const busy = inst.busy_share === null ? "-" : (100 * inst.busy_share).toFixed(1) + "%";
    const current = el("td", {}, ...jobs.map((job) => el("div", {"data-job": job.job_id},
      progressBar(job.progress), `${job.job_id} (${job.kind}, ${job.state})`)));
    if (!jobs.length) current.textContent = "-";
    return el("tr", {"data-instance": inst.instance_id},
      el("td", {text: inst.instance_id}), el("td", {text: inst.url}),
      el("td", {class: health, text: health}), el("td", {text: inst.job_types.join(", ")}),
      el("td", {text: `${inst.in_flight}/${inst.max_concurrent}`}), el("td", {text: busy}),
      current);
  });
  body.replaceChildren(...rows);
}

function cell(job, running) {
  if (!job) return el("span", {class: "cell"});
  const live = running.get(job.job_id);
  const title = [job.job_id, job.state, job.instance_id, job.error].filter(Boolean).join(" · ");
  const node = el("span", {class: `cell s-${job.state}`, "data-job": job.job_id,
                           "data-state": job.state, title});
  if (live && live.progress && live.progress.max) {
    const bar = el("span", {class: "bar"});
    bar.style.width = pct(live.progress.value, live.progress.max).toFixed(1) + "%";
    node.title += ` · ${live.progress.value}/${live.progress.max}`;
    node.append(bar);
  }
  return node;
}

function drawBatches(board) {
  const running = new Map(board.status.running.map((job) => [job.job_id, job]));
  const summary = new Map(board.status.batches.map((b) => [b.batch_id, b]));
  const cards = board.grids.map((grid) => {
    const info = summary.get(grid.batch_id) || {done: 0, total: 0};
    const labels = el("div", {class: "kinds"}, el("span", {text: " "}),
      ...KINDS.map((kind) => el("span", {text: kind})));
    const chunks = grid.chunks.map((row) => el("div", {class: "chunk"},
      el("span", {class: "n", text: row.chunk}),
      ...KINDS.map((kind) => cell(row[kind], running))));
    return el("div", {class: "batch", "data-batch": grid.batch_id, "data-state": grid.state},
      el("h3", {}, `${grid.batch_id} · ${grid.name}`,
        el("span", {class: "state", text: `${grid.state}, ${info.done}/${info.total} jobs`})),
      grid.reason ? el("p", {class: "reason", text: grid.reason}) : null,
      el("div", {class: "grid"}, labels, ...chunks));
  });
  const box = document.getElementById("batches");
  if (cards.length) box.replaceChildren(...cards);
  else box.replaceChildren(el("p", {class: "muted", text: "none yet"}));
}

function drawVideos(videos) {
  const list = document.getElementById("videos");
  if (!videos.length) {
    list.replaceChildren(el("li", {class: "muted", text: "none yet"}));
    return;
  }
  list.replaceChildren(...videos.map((video) => el("li", {},
    el("a", {href: video.url, text: `${video.batch_id} · ${video.name} · ${video.file}`}),
    el("video", {src: video.url, controls: "", preload: "metadata"}))));
}

function drawRejected(rejected) {
  const now = Date.now() / 1000;
  const body = document.querySelector("#rejected tbody");
  const rows = rejected.map((r) => el("tr", {}, el("td", {text: r.file}),
    el("td", {text: r.class}), el("td", {text: r.reason}), el("td", {text: ago(now - r.at)})));
  if (!rows.length) rows.push(el("tr", {}, el("td", {class: "muted", text: "none"})));
  body.replaceChildren(...rows);
}

async function drawGantt(board) {
  if (!board.gantt || board.version === ganttVersion || Date.now() - ganttAt < GANTT_MS) return;
  ganttAt = Date.now();
  const answer = await fetch("/gantt.svg", {cache: "no-store"});
  if (!answer.ok) return;
  // our own server's drawing, every text in it escaped (service/report.py)
  document.getElementById("gantt").innerHTML = await answer.text();
  ganttVersion = board.version;
}

async function refresh() {
  try {
    const answer = await fetch("/api/board", {cache: "no-store"});
    if (answer.ok) {
      const board = await answer.json();
      drawSummary(board);
      drawInstances(board.status);
      drawBatches(board);
      drawVideos(board.videos);
      drawRejected(board.rejected);
      await drawGantt(board);
      document.body.dataset.version = board.version;
    } else {
      document.getElementById("summary").textContent = "the daemon is starting…";
    }
  } catch (error) {
    document.getElementById("summary").textContent = "no answer from the daemon (stopped?)";
  }
  setTimeout(refresh, POLL_MS);
}

refresh();
