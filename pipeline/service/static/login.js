"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("login");
  form.addEventListener("submit", async ev => {
    ev.preventDefault();
    anim.setText("login-error", "");
    try {
      await anim.api("/api/session", {method: "POST", form: new URLSearchParams(new FormData(form)), login: false});
      location.assign(form.dataset.next);
    } catch (e) {
      anim.setText("login-error", e.status === 401 ? "Wrong user name or password." : e.message);
    }
  });
});
