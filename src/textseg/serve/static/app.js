// textseg demo page: upload an image, type labels, see the overlay, legend, areas and mask.
// Everything user-provided is inserted with textContent (never innerHTML).
(function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const state = { file: null, imageId: null, original: null, overlay: null, mask: null, maskData: null,
                  labels: [], view: "overlay", hover: -1, maskUrl: null };

  function setStatus(text, isError) {
    const s = $("status");
    s.textContent = text;
    s.className = isError ? "error" : "";
  }

  function loadImage(src) {
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => resolve(img);
      img.onerror = () => reject(new Error("the browser could not decode this image"));
      img.src = src;
    });
  }

  function pickFile(file) {
    if (!file) return;
    state.file = file;
    state.imageId = null;
    $("drop-text").textContent = file.name;
    $("segment").disabled = false;
    setStatus("");
  }

  $("file").addEventListener("change", (e) => pickFile(e.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) pickFile(e.dataTransfer.files[0]);
  });
  $("labels").addEventListener("keydown", (e) => { if (e.key === "Enter" && !$("segment").disabled) segment(); });
  $("segment").addEventListener("click", segment);

  document.querySelectorAll(".views button").forEach((b) => b.addEventListener("click", () => {
    state.view = b.dataset.view;
    document.querySelectorAll(".views button").forEach((x) => x.classList.toggle("active", x === b));
    draw();
  }));

  fetch("v1/models").then((r) => r.json()).then((info) => {
    $("model-name").textContent = "model: " + info.current.name;
    const sel = $("mode");
    (info.current.modes || []).forEach((m) => {
      const o = document.createElement("option");
      o.value = m;
      o.textContent = m;
      sel.appendChild(o);
    });
  }).catch(() => {});

  async function segment() {
    const labels = $("labels").value.trim();
    if (!state.file && !state.imageId) { setStatus("Pick an image first.", true); return; }
    if (!labels) { setStatus("Type at least one label.", true); return; }
    const form = new FormData();
    if (state.imageId) form.append("image_id", state.imageId);
    else form.append("image", state.file);
    form.append("labels", labels);
    if ($("mode").value) form.append("mode", $("mode").value);
    if ($("threshold").value !== "") form.append("threshold", $("threshold").value);
    form.append("return_mask", "true");
    form.append("return_overlay", "true");
    $("segment").disabled = true;
    setStatus("Segmenting…");
    try {
      let resp = await fetch("v1/segment", { method: "POST", body: form });
      if (resp.status === 404 && state.imageId) {  // server forgot the image: upload again
        state.imageId = null;
        return segment();
      }
      const body = await resp.json();
      if (!resp.ok) throw new Error(body.detail || resp.statusText);
      state.imageId = body.image_id;
      state.labels = body.legend;
      const [overlay, mask] = await Promise.all([
        loadImage("data:image/png;base64," + body.overlay_png),
        loadImage("data:image/png;base64," + body.mask_png)]);
      state.overlay = overlay;
      state.mask = mask;
      state.original = await loadImage(URL.createObjectURL(state.file));
      const c = document.createElement("canvas");
      c.width = mask.width;
      c.height = mask.height;
      const cx = c.getContext("2d");
      cx.drawImage(mask, 0, 0);
      state.maskData = cx.getImageData(0, 0, c.width, c.height);
      if (state.maskUrl) URL.revokeObjectURL(state.maskUrl);
      const blob = await (await fetch("data:image/png;base64," + body.mask_png)).blob();
      state.maskUrl = URL.createObjectURL(blob);
      $("download").href = state.maskUrl;
      renderLegend();
      $("result").hidden = false;
      $("timing").textContent = `${body.width}×${body.height} px · ${body.seconds.toFixed(2)} s`;
      draw();
      setStatus("Done.");
    } catch (err) {
      setStatus("Error: " + err.message, true);
    } finally {
      $("segment").disabled = false;
    }
  }

  function renderLegend() {
    const ul = $("legend");
    ul.replaceChildren();
    state.labels.forEach((lab, i) => {
      const li = document.createElement("li");
      li.dataset.index = String(i);
      const sw = document.createElement("span");
      sw.className = "swatch";
      sw.style.background = `rgb(${lab.color.join(",")})`;
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = lab.name;
      const bar = document.createElement("span");
      bar.className = "bar";
      const fill = document.createElement("span");
      fill.style.width = (100 * lab.fraction).toFixed(1) + "%";
      fill.style.background = `rgb(${lab.color.join(",")})`;
      bar.appendChild(fill);
      const pct = document.createElement("span");
      pct.className = "pct";
      pct.textContent = (100 * lab.fraction).toFixed(1) + "%";
      li.append(sw, name, bar, pct);
      li.addEventListener("mouseenter", () => { state.hover = i; li.classList.add("hover"); draw(); });
      li.addEventListener("mouseleave", () => { state.hover = -1; li.classList.remove("hover"); draw(); });
      ul.appendChild(li);
    });
  }

  function draw() {
    const canvas = $("canvas");
    const base = state.view === "original" ? state.original : state.view === "mask" ? state.mask : state.overlay;
    if (!base || !state.mask) return;
    canvas.width = state.mask.width;
    canvas.height = state.mask.height;
    const ctx = canvas.getContext("2d");
    ctx.drawImage(base, 0, 0, canvas.width, canvas.height);
    if (state.hover < 0) return;
    // Highlight the hovered label: dim every pixel whose mask colour is not the label's colour.
    const [r, g, b] = state.labels[state.hover].color;
    const img = ctx.getImageData(0, 0, canvas.width, canvas.height);
    const m = state.maskData.data, d = img.data;
    for (let p = 0; p < d.length; p += 4) {
      if (m[p] !== r || m[p + 1] !== g || m[p + 2] !== b) {
        d[p] = d[p] * 0.25; d[p + 1] = d[p + 1] * 0.25; d[p + 2] = d[p + 2] * 0.25;
      }
    }
    ctx.putImageData(img, 0, 0);
  }
})();
