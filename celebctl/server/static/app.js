// celebctl's page: the registry, a prompt box and an add form, on celebctl's own API (/api).
// Text from the server is always set as textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);

async function api(path, options) {
  const response = await fetch(path, options);
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    throw new Error((body && (body.message || body.detail)) || `HTTP ${response.status}`);
  }
  return body;
}

function say(id, text, isError) {
  const el = $(id);
  el.textContent = text;
  el.classList.toggle("error", Boolean(isError));
}

function el(tag, props, children) {
  const node = document.createElement(tag);
  Object.assign(node, props || {});
  for (const child of children || []) node.append(child);
  return node;
}

function fmt(value) {
  if (value === null || value === undefined) return "–";
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toFixed(3);
  return String(value);
}

async function loadStatus() {
  try {
    const s = await api("/api/status");
    const state = s.load_error ? `the model did not load: ${s.load_error.message}`
      : (s.ready ? "ready" : "loading the model…");
    $("status").textContent = `${s.model} · ${state}` +
      (s.waiting ? ` · ${s.waiting} job(s)` : "");
  } catch (e) {
    $("status").textContent = `not reachable: ${e.message}`;
  }
}

async function loadGallery() {
  const data = await api("/api/identities");
  const gallery = $("gallery");
  gallery.replaceChildren();
  $("gallery-empty").hidden = data.identities.length > 0;
  for (const ident of data.identities) {
    const rows = [["family", ident.family], ["model", ident.model],
                  ["basis", String(ident.basis_id || "").slice(0, 12)], ["photos", ident.faces]];
    const ev = ident.latest_eval;
    if (ev) {
      rows.push(["eval", String(ev.date || "").slice(0, 16).replace("T", " ")]);
      for (const [key, value] of Object.entries(ev)) {
        if (key.startsWith("identity_") || key === "prompt_similarity") rows.push([key, fmt(value)]);
      }
    }
    const dl = el("dl");
    for (const [k, v] of rows) dl.append(el("dt", { textContent: k }), el("dd", { textContent: fmt(v) }));
    const card = el("article", { className: "card" }, [
      ident.face_url ? el("img", { className: "face", src: ident.face_url, alt: `${ident.name}'s face` })
                     : el("div", { className: "face" }),
      el("h3", { textContent: ident.name }), dl,
    ]);
    if (ident.sheet_url) card.append(el("a", { href: ident.sheet_url, textContent: "eval sheet", target: "_blank" }));
    card.dataset.name = ident.name;
    gallery.append(card);
  }
  for (const warning of data.warnings) gallery.append(el("p", { className: "message error", textContent: warning }));
}

// Follow a job with server-sent events until it ends; resolves with the finished job.
function follow(job, bar, messageId) {
  return new Promise((resolve) => {
    bar.hidden = false;
    bar.value = 0;
    const source = new EventSource(`/api/jobs/${job.id}/events`);
    let last = job;
    source.addEventListener("job", (event) => {
      last = JSON.parse(event.data);
      const p = last.progress;
      bar.value = p.fraction;
      const what = p.phase ? `${p.phase} ${p.done}/${p.total}` : last.state;
      say(messageId, `${last.state}: ${what}${p.message ? " · " + p.message : ""}`);
    });
    source.addEventListener("end", () => { source.close(); bar.hidden = true; resolve(last); });
    source.onerror = async () => {
      source.close();
      try { last = await api(`/api/jobs/${job.id}`); } catch (e) { /* keep the last state */ }
      bar.hidden = true;
      resolve(last);
    };
  });
}

$("render-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const button = $("render-button");
  button.disabled = true;
  $("pictures").replaceChildren();
  try {
    const body = {
      prompt: $("prompt").value, negative: $("negative").value,
      steps: Number($("steps").value), num_images: Number($("num-images").value),
      seed: Number($("seed").value),
    };
    const { job } = await api("/api/render", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    const done = await follow(job, $("render-progress"), "render-message");
    if (done.error) {
      say("render-message", done.error.message, true);
    } else {
      for (const [i, url] of done.images.entries()) {
        $("pictures").append(el("img", { src: url, alt: `picture ${i + 1} of ${body.prompt}`, className: "picture" }));
      }
      const r = done.result || {};
      say("render-message", `${done.state}: ${done.images.length} picture(s)` +
          (r.identities && r.identities.length ? ` of ${r.identities.join(", ")}` : "") +
          (r.elapsed_s ? ` in ${r.elapsed_s} s` : ""));
    }
  } catch (e) {
    say("render-message", e.message, true);
  } finally {
    button.disabled = false;
  }
});

$("add-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const button = $("add-button");
  button.disabled = true;
  try {
    const form = new FormData();
    form.append("name", $("add-name").value);
    for (const file of $("add-photos").files) form.append("photos", file);
    if ($("add-steps").value) form.append("steps", $("add-steps").value);
    const { job } = await api("/api/identities", { method: "POST", body: form });
    const done = await follow(job, $("add-progress"), "add-message");
    if (done.error) {
      say("add-message", done.error.message, true);
    } else {
      say("add-message", `${done.state}: ${(done.result && done.result.identities || []).join(", ")} added.`);
      await loadGallery();
    }
  } catch (e) {
    say("add-message", e.message, true);
  } finally {
    button.disabled = false;
  }
});

loadStatus();
loadGallery().catch((e) => say("add-message", e.message, true));
setInterval(loadStatus, 3000);
