"use strict";
// The job list: /api/jobs with the page's own filters, refreshed while any job is still active.
const ACTIVE = new Set(["queued", "planning", "awaiting_approval", "rendering"]);

function jobRow(job) {
  const tr = document.createElement("tr");
  tr.dataset.jobId = job.id;
  for (const text of [job.id, job.title || job.script_name]) {
    const link = anim.el("a", text);
    link.href = "/jobs/" + encodeURIComponent(job.id);
    const td = document.createElement("td");
    td.append(link);
    tr.append(td);
  }
  const p = job.progress || {};
  const cells = [
    [job.series], [job.producer], [job.profile],
    [anim.statusLabel(job.status), "status " + job.status],
    [p.shots_total ? (p.shots_done || 0) + "/" + p.shots_total : "—"],
    [anim.yuan(p.spent_yuan), "num"], [anim.yuan(job.estimate_yuan), "num"], [anim.yuan(job.budget_yuan), "num"],
    [anim.when(job.created_at)],
  ];
  for (const [text, cls] of cells) {
    const td = document.createElement("td");
    if (cls === "num") { td.className = "num"; anim.write(td, text); }
    else if (cls) td.append(anim.el("span", text, cls));
    else anim.write(td, text);
    tr.append(td);
  }
  return tr;
}

async function refresh() {
  const params = new URLSearchParams();
  for (const [k, v] of new URLSearchParams(location.search)) if (v && ["series", "status", "producer"].includes(k)) params.set(k, v);
  let active = false;
  try {
    const data = await anim.api("/api/jobs" + (params.toString() ? "?" + params : ""));
    const tbody = document.querySelector("#jobs tbody");
    tbody.replaceChildren(...data.jobs.map(jobRow));
    document.getElementById("jobs-empty").hidden = data.jobs.length > 0;
    anim.setText("jobs-error", "");
    active = data.jobs.some(j => ACTIVE.has(j.status));
  } catch (e) {
    anim.setText("jobs-error", e.message);
  }
  setTimeout(refresh, active ? 2000 : 10000);
}

document.addEventListener("DOMContentLoaded", () => {
  for (const input of document.querySelectorAll("#filters input")) input.lang = anim.langOf(input.value) || "";
  refresh();
});
