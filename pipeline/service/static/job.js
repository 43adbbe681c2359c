"use strict";
// The job page: one EventSource on /api/jobs/{id}/events keeps progress, cost, status and the
// buttons current; the log tail and the storyboard panels are fetched when the job changes.
const ACTIVE = new Set(["queued", "planning", "awaiting_approval", "rendering"]);
const RETRYABLE = new Set(["failed", "stopped", "cancelled"]);
// A panel's decision as /panels gives it: approved, rejected, or pending (also null).
const APPROVED = new Set(["approved", "approve"]), REJECTED = new Set(["rejected", "reject"]);

document.addEventListener("DOMContentLoaded", () => {
  const root = document.getElementById("job");
  const id = root.dataset.jobId;
  const base = "/api/jobs/" + encodeURIComponent(id);
  let job = null, source = null, logAt = 0, logTimer = null, panelsFor = null;

  function render(j) {
    job = j;
    const p = j.progress || {};
    anim.setText("job-title", j.title || j.script_name || ("Job " + j.id));
    const st = document.getElementById("job-status");
    st.textContent = anim.statusLabel(j.status);
    st.className = "status " + j.status;
    anim.setText("job-meta", [j.series && "Series " + j.series, "by " + j.producer, "profile " + j.profile,
      j.aspect, "job " + j.id, "submitted " + anim.when(j.created_at)].filter(Boolean).join(" · "));
    anim.setText("job-error", j.error || "");
    const stopped = document.getElementById("job-stopped");
    stopped.hidden = !j.stopped_reason;
    anim.write(stopped, j.stopped_reason ? "Stopped: " + j.stopped_reason : "");

    anim.setText("stage", p.stage || "—");
    const total = p.shots_total || 0, done = p.shots_done || 0;
    anim.setText("shots", total ? done + " / " + total : "—");
    document.getElementById("shots-bar").style.width = (total ? 100 * done / total : 0) + "%";
    anim.setText("eta", ACTIVE.has(j.status) ? anim.duration(p.eta_s) : "—");
    anim.setText("spent", anim.yuan(p.spent_yuan));
    const share = (of, what) => {
      const pct = 100 * Number(p.spent_yuan || 0) / of;
      return (pct > 0 && pct < 1 ? "<1" : Math.round(pct)) + "% of the " + what;
    };
    anim.setText("spent-share", [j.estimate_yuan && share(j.estimate_yuan, "estimate"),
      j.budget_yuan && share(j.budget_yuan, "budget")].filter(Boolean).join(", "));
    anim.setText("estimate", anim.yuan(j.estimate_yuan));
    anim.setText("budget", j.budget_yuan === null || j.budget_yuan === undefined ? "none" : anim.yuan(j.budget_yuan));
    anim.setText("attempt", j.attempt);
    const cap = Number(j.budget_yuan || j.estimate_yuan || 0), spent = Number(p.spent_yuan || 0);
    const costBar = document.getElementById("cost-bar");
    costBar.style.width = (cap ? Math.min(100, 100 * spent / cap) : 0) + "%";
    costBar.classList.toggle("over", cap > 0 && spent > cap);
    const mark = document.getElementById("est-mark");
    mark.hidden = !(j.budget_yuan && j.estimate_yuan);
    if (!mark.hidden) mark.style.left = Math.min(100, 100 * j.estimate_yuan / j.budget_yuan) + "%";

    document.getElementById("cancel-btn").hidden = !ACTIVE.has(j.status);
    document.getElementById("retry-btn").hidden = !RETRYABLE.has(j.status);
    const ml = document.getElementById("mlflow-link");
    ml.hidden = !j.mlflow_run_url;
    if (j.mlflow_run_url) ml.href = j.mlflow_run_url;
    document.getElementById("mlflow-open").hidden = !j.mlflow_open;
    if (j.mlflow_open) {
      anim.setText("mlflow-run", j.mlflow_run_id);
      anim.setText("mlflow-cmd", j.mlflow_open);
    }

    const files = j.files || [];
    document.getElementById("files-card").hidden = files.length === 0;
    document.getElementById("files").replaceChildren(...files.map(name => {
      const a = anim.el("a", name);
      a.href = base + "/files/" + encodeURIComponent(name);
      a.setAttribute("download", name);
      const li = document.createElement("li");
      li.append(a);
      return li;
    }));

    // Panels exist once the storyboard is drawn; fetch them again whenever the status changes.
    if (panelsFor !== j.status && j.status !== "queued" && j.status !== "planning") { panelsFor = j.status; loadPanels(); }
    scheduleLog();
    if (!ACTIVE.has(j.status) && source) { source.close(); source = null; }
  }

  // The log tail at most every 2 s while the job runs, and once more when it has ended.
  function scheduleLog() {
    if (logTimer) return;
    const wait = Math.max(0, logAt + 2000 - Date.now());
    logTimer = setTimeout(async () => {
      logTimer = null;
      logAt = Date.now();
      try {
        const text = await anim.api(base + "/logs?tail=200", {text: true});
        const pre = document.getElementById("log");
        const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
        anim.write(pre, text);
        if (atEnd) pre.scrollTop = pre.scrollHeight;
      } catch (e) { /* no log yet */ }
    }, wait);
  }

  async function loadPanels() {
    let data;
    try { data = await anim.api(base + "/panels"); } catch (e) { return; }
    const panels = data.panels || [];
    document.getElementById("panels-card").hidden = panels.length === 0;
    const deciding = job && job.status === "awaiting_approval";
    const decided = p => APPROVED.has(p.decision) || REJECTED.has(p.decision);
    document.getElementById("approve-all").hidden = !deciding || panels.every(decided);
    const tpl = document.getElementById("panel-tpl");
    document.getElementById("panels").replaceChildren(...panels.map(p => {
      const fig = tpl.content.firstElementChild.cloneNode(true);
      fig.dataset.shot = p.shot;
      fig.classList.toggle("approved", APPROVED.has(p.decision));
      fig.classList.toggle("rejected", REJECTED.has(p.decision));
      const img = fig.querySelector("img");
      img.src = p.url;
      img.alt = "storyboard panel, shot " + p.shot;
      anim.write(fig.querySelector(".shot"), "Shot " + p.shot);
      anim.write(fig.querySelector(".decision"), decided(p)
        ? (APPROVED.has(p.decision) ? "approved" : "rejected") + (p.by ? " by " + p.by : "") + (p.at ? ", " + anim.when(p.at) : "")
        : "undecided");
      const comment = fig.querySelector(".comment");
      comment.value = p.comment || "";
      comment.lang = anim.langOf(comment.value) || "";
      comment.disabled = !deciding;
      for (const [cls, decision] of [["approve", "approve"], ["reject", "reject"]]) {
        const btn = fig.querySelector("." + cls);
        btn.hidden = !deciding;
        btn.addEventListener("click", () => decide(p.shot, decision, comment.value, btn));
      }
      return fig;
    }));
  }

  async function decide(shot, decision, comment, btn) {
    btn.disabled = true;
    try {
      await anim.api(base + "/approvals", {method: "POST", json: {shot, decision, comment}});
      anim.setText("job-error", "");
    } catch (e) { anim.setText("job-error", e.message); }
    btn.disabled = false;
    await loadPanels();
  }

  async function act(path, btn) {
    btn.disabled = true;
    try {
      await anim.api(base + path, {method: "POST"});
    } catch (e) {
      anim.setText("job-error", e.message);
    }
    btn.disabled = false;
    await reload();
  }

  // Live updates; if the stream cannot be opened (or drops), read the job once and try again.
  function follow() {
    if (source || (job && !ACTIVE.has(job.status))) return;
    source = new EventSource(base + "/events");
    source.onmessage = ev => render(JSON.parse(ev.data));
    source.onerror = () => {
      if (source && source.readyState === EventSource.CLOSED) { source = null; setTimeout(reload, 2000); }
    };
  }

  async function reload() {
    try { render(await anim.api(base)); } catch (e) {
      anim.setText("job-error", e.status === 404 ? "No such job." : e.message);
      if (e.status === 404) return;
    }
    follow();
  }

  document.getElementById("approve-all").addEventListener("click", async ev => {
    ev.target.disabled = true;
    try { await anim.api(base + "/approve-all", {method: "POST"}); } catch (e) { anim.setText("job-error", e.message); }
    ev.target.disabled = false;
    await loadPanels();
  });
  document.getElementById("cancel-btn").addEventListener("click", ev => act("/cancel", ev.target));
  document.getElementById("retry-btn").addEventListener("click", ev => act("/retry", ev.target));
  reload();
});
