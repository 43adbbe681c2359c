"use strict";
// New job: every change of the inputs asks /api/plan for the estimate; submitting is possible
// only once the estimate for exactly these inputs has come back.
document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("new-job");
  const submitBtn = document.getElementById("submit-btn");
  let planned = null;   // the inputs the shown estimate is for
  let seq = 0;          // answers to older requests are ignored

  function fields({withJobFields}) {
    const fd = new FormData();
    const file = document.getElementById("script").files[0];
    if (file) fd.append("script", file, file.name);
    fd.append("profile", document.getElementById("profile").value);
    const aspect = document.getElementById("aspect").value;
    if (aspect) fd.append("aspect", aspect);
    const budget = document.getElementById("budget").value.trim();
    if (budget) fd.append("budget_yuan", budget);
    if (withJobFields) {
      const series = document.getElementById("series").value.trim();
      if (series) fd.append("series", series);
      fd.append("approval_gate", document.getElementById("approval-gate").checked ? "true" : "false");
    }
    return fd;
  }

  function key() {
    const file = document.getElementById("script").files[0];
    return JSON.stringify([file && [file.name, file.size, file.lastModified],
      document.getElementById("profile").value, document.getElementById("aspect").value,
      document.getElementById("budget").value.trim()]);
  }

  function show(est) {
    document.getElementById("estimate").hidden = false;
    anim.setText("est-yuan", anim.yuan(est.estimate_yuan));
    const budget = document.getElementById("budget").value.trim();
    anim.setText("est-budget", budget === "" ? "No budget set." :
      (Number(est.estimate_yuan) > Number(budget) ? "Over the budget of " : "Within the budget of ") + anim.yuan(budget) + ".");
    anim.setText("est-shots", est.shots);
    anim.setText("est-frames", est.frames);
    anim.setText("est-minutes", est.minutes === undefined ? "—" : Number(est.minutes).toFixed(2));
    const rows = Object.entries(est.per_stage || {}).map(([stage, v]) => {
      const tr = document.createElement("tr");
      tr.append(anim.el("td", stage), anim.el("td", typeof v === "number" ? anim.yuan(v) : JSON.stringify(v), "num"));
      return tr;
    });
    document.getElementById("est-stages").replaceChildren(...rows);
    document.getElementById("est-warnings").replaceChildren(...(est.warnings || []).map(w => anim.el("li", w)));
  }

  async function estimate() {
    if (planned !== null && planned === key()) return;  // the shown estimate is for these inputs
    submitBtn.disabled = true;
    planned = null;
    anim.setText("new-error", "");
    if (!document.getElementById("script").files[0]) return;
    const mine = ++seq, k = key();
    try {
      const est = await anim.api("/api/plan", {method: "POST", form: fields({withJobFields: false})});
      if (mine !== seq) return;
      show(est);
      planned = k;
      submitBtn.disabled = false;
    } catch (e) {
      if (mine !== seq) return;
      document.getElementById("estimate").hidden = true;
      anim.setText("new-error", e.message);
    }
  }

  let submission = null;  // the Idempotency-Key of the submission being sent; a changed form is a new one
  form.addEventListener("input", () => { submission = null; });
  form.addEventListener("change", () => { submission = null; });
  for (const id of ["script", "profile", "aspect", "budget"])
    document.getElementById(id).addEventListener("change", estimate);
  document.getElementById("estimate-btn").addEventListener("click", estimate);

  form.addEventListener("submit", async ev => {
    ev.preventDefault();
    if (planned !== key()) { await estimate(); return; }
    submitBtn.disabled = true;
    // one key per submission of this form: a second click or a retry after a lost answer queues nothing more
    submission = submission || (window.crypto && crypto.randomUUID ? crypto.randomUUID()
                                : Date.now().toString(36) + Math.random().toString(36).slice(2));
    try {
      const job = await anim.api("/api/jobs", {method: "POST", form: fields({withJobFields: true}),
                                               headers: {"Idempotency-Key": "page-" + submission}});
      location.assign("/jobs/" + encodeURIComponent(job.id));
    } catch (e) {
      anim.setText("new-error", e.message);
      submitBtn.disabled = false;
    }
  });
});
