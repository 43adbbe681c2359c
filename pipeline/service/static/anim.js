// Helpers every page shares. User text is only ever written with textContent.
"use strict";
const anim = (() => {
  const body = document.body;
  const csrf = {[body.dataset.csrfName]: body.dataset.csrfValue};

  function toLogin() {
    const here = location.pathname + location.search;
    location.assign("/login?next=" + encodeURIComponent(here));
  }

  // The server's one-line message: {"error": ...} from the service, {"detail": ...} from FastAPI.
  async function message(resp) {
    const text = await resp.text();
    try {
      const data = JSON.parse(text);
      if (typeof data.error === "string") return data.error;
      if (typeof data.detail === "string") return data.detail;
      if (Array.isArray(data.detail)) return data.detail.map(d => (d.loc || []).join(".") + ": " + d.msg).join("; ");
    } catch (e) { /* not JSON */ }
    return text.trim() || (resp.status + " " + resp.statusText);
  }

  // fetch against the service's /api with the session cookie; changes carry the CSRF header.
  async function api(path, {method = "GET", form = null, json = undefined, text = false, login = true,
                            headers = {}} = {}) {
    const opts = {method, credentials: "same-origin", headers: {...headers}};
    if (method !== "GET") Object.assign(opts.headers, csrf);
    if (form) opts.body = form;
    if (json !== undefined) { opts.headers["Content-Type"] = "application/json"; opts.body = JSON.stringify(json); }
    const resp = await fetch(path, opts);
    if (resp.status === 401 && login) { toLogin(); throw new Error("signed out"); }
    if (!resp.ok) { const err = new Error(await message(resp)); err.status = resp.status; throw err; }
    if (text) return resp.text();
    return resp.status === 204 ? null : resp.json();
  }

  // Yuan to the cent, and a draft's fractions of a fen to two significant digits (¥0.00006).
  function yuan(v) {
    if (v === null || v === undefined || v === "") return "—";
    const n = Number(v);
    return "¥" + (n === 0 || Math.abs(n) >= 0.01 ? n.toFixed(2) : String(Number(n.toPrecision(2))));
  }

  function duration(s) {
    if (s === null || s === undefined) return "—";
    s = Math.max(0, Math.round(Number(s)));
    const h = Math.floor(s / 3600), m = Math.floor(s / 60) % 60, sec = s % 60;
    return (h ? h + ":" + String(m).padStart(2, "0") : m) + ":" + String(sec).padStart(2, "0");
  }

  function when(iso) {
    if (!iso) return "—";
    const d = new Date(iso);
    return isNaN(d) ? String(iso) : d.toLocaleString();
  }

  // The page's font is one Noto Sans CJK face; its glyph forms follow the text's language
  // (OpenType locl), so CJK text is marked: kana -> ja, hangul -> ko, other Han -> zh-Hans.
  function langOf(text) {
    if (/[\u3040-\u30ff]/.test(text)) return "ja";
    if (/[\uac00-\ud7af\u1100-\u11ff]/.test(text)) return "ko";
    if (/[\u3400-\u9fff\uf900-\ufaff]/.test(text)) return "zh-Hans";
    return "";
  }

  function write(node, text) {
    text = (text === null || text === undefined) ? "" : String(text);
    node.textContent = text;
    const lang = langOf(text);
    if (lang) node.lang = lang; else node.removeAttribute("lang");
    return node;
  }

  function el(tag, text, cls) {
    const node = write(document.createElement(tag), text);
    if (cls) node.className = cls;
    return node;
  }

  function setText(id, text) { write(document.getElementById(id), text); }

  function statusLabel(s) { return String(s || "").replace(/_/g, " "); }

  async function showMe() {
    const me = document.getElementById("me");
    if (!me) return;
    try {
      const who = await api("/api/me");
      write(me, who.username + (who.role === "admin" ? " (admin)" : ""));
      body.dataset.role = who.role;
    } catch (e) { /* a 401 already went to the sign-in page */ }
  }

  document.addEventListener("DOMContentLoaded", () => {
    showMe();
    const out = document.getElementById("sign-out");
    if (out) out.addEventListener("click", async () => {
      try { await api("/api/session", {method: "DELETE", login: false}); } catch (e) { /* signed out anyway */ }
      location.assign("/login");
    });
  });

  return {api, yuan, duration, when, el, setText, write, langOf, statusLabel, toLogin};
})();
