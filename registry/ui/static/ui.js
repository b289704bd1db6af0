// The explorer's few behaviours: class filter, opacity slider, explain on demand (no build step).
"use strict";
(function () {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const filter = document.getElementById("class-filter");
  if (filter) filter.addEventListener("change", () => {
    document.querySelectorAll("tr.row").forEach(r => {
      r.hidden = filter.value !== "" && r.dataset.class !== filter.value;
    });
  });
  const opacity = document.getElementById("opacity");
  if (opacity) opacity.addEventListener("input", () => {
    document.querySelectorAll("img.map, #od-map").forEach(i => { i.style.opacity = opacity.value / 100; });
  });
  // DeConvolve's and PV's panels, text and filters (all set as text or data: images, never as HTML).
  function showExtras(out) {
    const panels = document.getElementById("od-panels"), table = document.getElementById("od-filters");
    panels.replaceChildren(...(out.panels || []).map(p => {
      const fig = document.createElement("figure"), img = document.createElement("img");
      const cap = document.createElement("figcaption");
      img.src = p.image; img.alt = p.title; cap.textContent = p.title;
      fig.append(img, cap);
      return fig;
    }));
    document.getElementById("od-text").textContent = out.text || "";
    const rows = (out.filters || []).map(f => {
      const tr = document.createElement("tr");
      for (const v of [f.filter, f.sign, f.score, f.sentence]) {
        const td = document.createElement("td"); td.textContent = v; tr.append(td);
      }
      return tr;
    });
    const head = document.createElement("tr");
    for (const h of ["filter", "sign", "score", "description"]) {
      const th = document.createElement("th"); th.textContent = h; head.append(th);
    }
    table.replaceChildren(...(rows.length ? [head, ...rows] : []));
    table.hidden = !rows.length;
  }
  const form = document.getElementById("ondemand");
  if (!form) return;
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const busy = document.getElementById("busy"), error = document.getElementById("ondemand-error");
    const file = document.getElementById("upload").files[0];
    const q = new URLSearchParams({method: document.getElementById("method").value,
      sample: document.getElementById("sample").value, target: document.getElementById("target").value,
      layer: document.getElementById("layer").value});
    busy.hidden = false; error.textContent = "";
    try {
      const resp = await fetch(form.dataset.url + "?" + q, {method: "POST", body: file || "",
        headers: {"X-CSRF-Token": csrf, "Content-Type": "application/octet-stream"}, credentials: "same-origin"});
      const out = resp.headers.get("content-type").includes("json") ? await resp.json() : {error: await resp.text()};
      const img = document.getElementById("od-image"), map = document.getElementById("od-map");
      if (out.image) { img.src = out.image; img.hidden = false; }
      if (out.error) { error.textContent = out.error; map.hidden = true; }
      else {
        map.src = out.map; map.hidden = false;
        document.getElementById("od-info").textContent = `class ${out.target_name} · ${out.seconds} s ${out.layer ? "· layer " + out.layer : ""}`;
      }
      showExtras(out);
    } catch (e) { error.textContent = "request failed: " + e; }
    finally { busy.hidden = true; }
  });
})();
