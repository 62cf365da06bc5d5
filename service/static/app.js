// Glasses Vision test page. Plain JavaScript, no build step; it talks only to the service that served it.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "glasses-vision-api-key";

// ------------------------------------------------------------------ shared helpers
function apiHeaders(extra) {
  const headers = Object.assign({}, extra || {});
  const key = $("api-key").value.trim();
  if (key) headers["X-API-Key"] = key;
  return headers;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.message || body.detail || JSON.stringify(body);
  } catch (_) {
    return `${response.status} ${response.statusText}`;
  }
}

function setStatus(element, text, isError) {
  element.textContent = text;
  element.classList.toggle("error", Boolean(isError));
}

// The class colours of export/draw.py (class_color), so the page and rendered PNGs agree.
function classColor(classId) {
  const hue = (classId * 0.618033988749895 + 0.05) % 1.0;
  const value = classId % 2 === 0 ? 1.0 : 0.8;
  const s = 0.85;
  const i = Math.floor(hue * 6);
  const f = hue * 6 - i;
  const p = value * (1 - s), q = value * (1 - s * f), t = value * (1 - s * (1 - f));
  const [r, g, b] = [[value, t, p], [q, value, p], [p, value, t], [p, q, value], [t, p, value], [value, p, q]][i % 6];
  return [r, g, b].map((c) => Math.round(c * 255));
}

function textColor(rgb) {  // black or white, whichever contrasts more (WCAG), as export/draw.py text_color
  const lin = rgb.map((c) => { c /= 255; return c <= 0.03928 ? c / 12.92 : Math.pow((c + 0.055) / 1.055, 2.4); });
  const lum = 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2];
  return (lum + 0.05) / 0.05 >= 1.05 / (lum + 0.05) ? "#000" : "#fff";
}

function formatSeconds(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
  seconds = Math.round(seconds);
  const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
  return h ? `${h} h ${m} min` : m ? `${m} min ${s} s` : `${s} s`;
}

// ------------------------------------------------------------------ tabs
function showTab(name) {
  for (const tab of ["detect", "jobs"]) {
    const on = tab === name;
    $(`tab-${tab}`).setAttribute("aria-selected", String(on));
    $(`panel-${tab}`).hidden = !on;
  }
  if (name === "jobs") refreshJobs();
}

// ------------------------------------------------------------------ detect tab
const detectState = { blob: null, width: 0, height: 0, seq: 0, camera: null, cameraFrames: 0, cameraStart: 0 };

async function loadModels() {
  const select = $("model");
  try {
    const response = await fetch("/v1/models", { headers: apiHeaders() });
    if (!response.ok) throw new Error(await errorText(response));
    const body = await response.json();
    select.replaceChildren();
    for (const model of body.models) {
      const option = document.createElement("option");
      option.value = model.id;
      const classes = model.classes ? ` · ${model.classes.length} classes` : "";
      option.textContent = `${model.id}${model.default ? " (default)" : ""}${classes}`;
      option.selected = model.id === body.default_model;
      select.append(option);
    }
    if (!body.models.length) setStatus($("status"), "No model is registered yet.", true);
  } catch (err) {
    setStatus($("status"), `Could not list the models: ${err.message}`, true);
  }
}

function drawBitmap(source, width, height) {
  const canvas = $("frame");
  if (canvas.width !== width || canvas.height !== height) {
    canvas.width = width;
    canvas.height = height;
  }
  canvas.getContext("2d").drawImage(source, 0, 0, width, height);
  detectState.width = width;
  detectState.height = height;
  $("stage").classList.remove("empty");
}

async function decodeImage(blob) {
  // The service applies the EXIF orientation (as browsers do by default): draw the upright frame its boxes are on.
  return await createImageBitmap(blob, { imageOrientation: "from-image" });
}

async function showFile(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    setStatus($("status"), `${file.name} is not an image.`, true);
    return;
  }
  stopCamera();
  let bitmap;
  try {
    bitmap = await decodeImage(file);
  } catch (err) {
    setStatus($("status"), `The browser cannot read ${file.name}: ${err.message}`, true);
    return;
  }
  drawBitmap(bitmap, bitmap.width, bitmap.height);
  bitmap.close();
  detectState.blob = file;
  clearBoxes();
  await runDetect(file, file.name || "image");
}

async function runDetect(blob, name) {
  const model = $("model").value;
  const conf = $("conf").value;
  const seq = ++detectState.seq;
  const overlay = $("overlay");
  overlay.dataset.state = "busy";
  const form = new FormData();
  form.append("image", blob, name);
  const params = new URLSearchParams({ conf });
  if (model) params.set("model", model);
  const started = performance.now();
  let response, body;
  try {
    response = await fetch(`/v1/detect?${params}`, { method: "POST", body: form, headers: apiHeaders() });
    body = response.ok ? await response.json() : null;
  } catch (err) {
    if (seq === detectState.seq) {
      overlay.dataset.state = "error";
      setStatus($("status"), `The request failed: ${err.message}`, true);
    }
    return null;
  }
  if (seq !== detectState.seq) return null;  // a newer request (slider, model, frame) has been sent
  if (!response.ok) {
    overlay.dataset.state = "error";
    setStatus($("status"), `Detect failed (${response.status}): ${await errorText(response)}`, true);
    return null;
  }
  const roundTrip = performance.now() - started;
  renderBoxes(body, conf);
  const n = body.detections.length;
  let text = `${n} box${n === 1 ? "" : "es"} · ${body.model} · inference ${body.inference_ms.toFixed(1)} ms` +
             ` · round trip ${roundTrip.toFixed(0)} ms · ${body.image.width}×${body.image.height}`;
  if (detectState.camera) {
    const secs = (performance.now() - detectState.cameraStart) / 1000;
    text += ` · camera ${(detectState.cameraFrames / Math.max(secs, 1e-3)).toFixed(1)} frames/s`;
  }
  setStatus($("status"), text, false);
  return body;
}

function clearBoxes() {
  const overlay = $("overlay");
  overlay.replaceChildren();
  overlay.dataset.count = "0";
  $("detections").hidden = true;
}

function renderBoxes(body, conf) {
  const overlay = $("overlay");
  const { width, height } = body.image;
  const boxes = [];
  const rows = [];
  body.detections.forEach((d, i) => {
    const rgb = classColor(d.class_id);
    const color = `rgb(${rgb.join(",")})`;
    const box = document.createElement("div");
    box.className = "box";
    box.dataset.className = d.class_name;
    box.dataset.score = d.score.toFixed(4);
    box.style.left = `${(100 * d.x1) / width}%`;
    box.style.top = `${(100 * d.y1) / height}%`;
    box.style.width = `${(100 * (d.x2 - d.x1)) / width}%`;
    box.style.height = `${(100 * (d.y2 - d.y1)) / height}%`;
    box.style.color = color;
    box.style.zIndex = String(body.detections.length - i);  // the best-scored box and label on top
    if (d.y1 < 0.06 * height) box.classList.add("label-inside");
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = `${d.class_name} ${d.score.toFixed(2)}`;
    label.style.background = color;
    label.style.color = textColor(rgb);
    box.append(label);
    boxes.push(box);

    const row = document.createElement("tr");
    for (const cell of [i + 1, d.class_name, d.score.toFixed(3),
                        [d.x1, d.y1, d.x2, d.y2].map((v) => v.toFixed(1)).join(", ")]) {
      const td = document.createElement("td");
      td.textContent = cell;
      row.append(td);
    }
    rows.push(row);
  });
  overlay.replaceChildren(...boxes);
  overlay.dataset.count = String(boxes.length);
  overlay.dataset.conf = conf;
  overlay.dataset.state = "done";
  $("detections").tBodies[0].replaceChildren(...rows);
  $("detections").hidden = rows.length === 0;
}

let redetectTimer = null;
function redetectSoon() {
  if (detectState.camera || !detectState.blob) return;  // the camera loop picks the new settings up itself
  clearTimeout(redetectTimer);
  redetectTimer = setTimeout(() => runDetect(detectState.blob, detectState.blob.name || "image"), 150);
}

// The camera: one frame at a time, the next one sent when the boxes of the last one are drawn.
async function startCamera() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    setStatus($("status"), "The camera needs a secure page: open the service at http://localhost or over https.", true);
    return;
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({
      video: { facingMode: "environment", width: { ideal: 1280 }, height: { ideal: 720 } }, audio: false,
    });
  } catch (err) {
    setStatus($("status"), `No camera: ${err.message}`, true);
    return;
  }
  const video = $("video");
  video.srcObject = stream;
  await video.play();
  detectState.camera = stream;
  detectState.blob = null;
  detectState.cameraFrames = 0;
  detectState.cameraStart = performance.now();
  $("camera-start").hidden = true;
  $("camera-stop").hidden = false;
  cameraLoop();
}

async function cameraLoop() {
  const video = $("video");
  while (detectState.camera) {
    if (!video.videoWidth) {
      await new Promise((resolve) => requestAnimationFrame(resolve));
      continue;
    }
    drawBitmap(video, video.videoWidth, video.videoHeight);
    const blob = await new Promise((resolve) => $("frame").toBlob(resolve, "image/jpeg", 0.85));
    if (!detectState.camera) break;
    detectState.cameraFrames += 1;
    const body = await runDetect(blob, "camera.jpg");
    if (!body) await new Promise((resolve) => setTimeout(resolve, 1000));  // an error: do not hammer the service
  }
}

function stopCamera() {
  if (!detectState.camera) return;
  for (const track of detectState.camera.getTracks()) track.stop();
  detectState.camera = null;
  $("video").srcObject = null;
  $("camera-start").hidden = false;
  $("camera-stop").hidden = true;
}

// ------------------------------------------------------------------ jobs tab
const jobState = { id: null, abort: null, points: [], evals: [], total: null, lastStep: 0, ended: false, drawQueued: false };
let jobsTimer = null;

async function refreshJobs() {
  clearTimeout(jobsTimer);
  const status = $("jobs-status");
  try {
    const response = await fetch("/v1/jobs?limit=50", { headers: apiHeaders() });
    if (response.status === 401) {
      setStatus(status, "Enter the service's API key above (GLASSES_VISION_API_KEYS, or the file <home>/api_key).", true);
      return;
    }
    if (!response.ok) throw new Error(await errorText(response));
    const body = await response.json();
    renderJobs(body.jobs);
    setStatus(status, `${body.jobs.length} job${body.jobs.length === 1 ? "" : "s"} · updated ${new Date().toLocaleTimeString()}`);
  } catch (err) {
    setStatus(status, `Could not list the jobs: ${err.message}`, true);
  }
  if (!$("panel-jobs").hidden) jobsTimer = setTimeout(refreshJobs, 5000);
}

function renderJobs(jobs) {
  const rows = jobs.map((job) => {
    const row = document.createElement("tr");
    row.dataset.jobId = job.id;
    row.classList.toggle("selected", job.id === jobState.id);
    const cells = [job.id, job.name || "", job.state,
                   job.total_steps ? `${job.step} / ${job.total_steps}` : String(job.step),
                   `${Math.round(job.progress * 100)} %`, new Date(job.created_at * 1000).toLocaleString()];
    cells.forEach((text, i) => {
      const td = document.createElement("td");
      td.textContent = text;
      if (i === 2) td.className = `state state-${job.state}`;
      row.append(td);
    });
    row.addEventListener("click", () => followJob(job.id, job.name));
    return row;
  });
  $("jobs-table").tBodies[0].replaceChildren(...rows);
}

function followJob(id, name) {
  if (jobState.abort) jobState.abort.abort();
  Object.assign(jobState, { id, abort: new AbortController(), points: [], evals: [], total: null, lastStep: 0, ended: false });
  for (const row of $("jobs-table").tBodies[0].rows) row.classList.toggle("selected", row.dataset.jobId === id);
  $("job-detail").hidden = false;
  $("job-title").textContent = name ? `${name} (${id})` : id;
  $("job-error").hidden = true;
  for (const stat of ["state", "step", "loss", "lr", "eta"]) $(`stat-${stat}`).textContent = "–";
  drawChart();
  streamEvents(id, jobState.abort.signal);
}

// Server-Sent Events read with fetch (EventSource cannot send the X-API-Key header); reconnects with Last-Event-ID.
async function streamEvents(id, signal) {
  while (!signal.aborted && !jobState.ended) {
    const headers = apiHeaders({ Accept: "text/event-stream" });
    if (jobState.lastStep) headers["Last-Event-ID"] = String(jobState.lastStep);
    try {
      const response = await fetch(`/v1/jobs/${encodeURIComponent(id)}/events`, { headers, signal });
      if (!response.ok) {
        showJobError(`Events: ${await errorText(response)}`);
        return;
      }
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replace(/\r\n?/g, "\n");
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          handleEvent(buffer.slice(0, cut));
          buffer = buffer.slice(cut + 2);
        }
      }
    } catch (err) {
      if (signal.aborted) return;
    }
    if (!jobState.ended) await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

function handleEvent(block) {
  let event = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
  }
  if (!data.length) return;
  const payload = JSON.parse(data.join("\n"));
  if (event === "step") {
    jobState.lastStep = payload.step;
    if (payload.total_steps) jobState.total = payload.total_steps;
    if (payload.loss !== null && payload.loss !== undefined) jobState.points.push([payload.step, payload.loss]);
    $("stat-step").textContent = payload.total_steps ? `${payload.step} / ${payload.total_steps}` : String(payload.step);
    $("stat-loss").textContent = payload.loss === null ? "–" : payload.loss.toFixed(4);
    $("stat-lr").textContent = payload.lr === null ? "–" : payload.lr.toExponential(2);
    $("stat-eta").textContent = formatSeconds(payload.eta_s);
    updateJobRow(payload.step, payload.total_steps);
    queueChart();
  } else if (event === "eval") {
    jobState.evals.push(payload);
  } else if (event === "state" || event === "end") {
    if (payload.total_steps) jobState.total = payload.total_steps;
    const state = $("stat-state");
    state.textContent = payload.state;
    state.className = `state state-${payload.state}`;
    if (payload.error) showJobError(payload.error);
    if (event === "end") {
      jobState.ended = true;
      if (payload.state === "succeeded") $("stat-eta").textContent = "done";
      refreshJobs();
    }
  }
}

function updateJobRow(step, total) {  // the table refreshes every 5 s; the followed job's row follows the stream
  const row = [...$("jobs-table").tBodies[0].rows].find((r) => r.dataset.jobId === jobState.id);
  if (!row) return;
  row.cells[3].textContent = total ? `${step} / ${total}` : String(step);
  if (total) row.cells[4].textContent = `${Math.round((100 * step) / total)} %`;
}

function showJobError(text) {
  $("job-error").textContent = text;
  $("job-error").hidden = false;
}

function queueChart() {
  if (jobState.drawQueued) return;
  jobState.drawQueued = true;
  requestAnimationFrame(() => { jobState.drawQueued = false; drawChart(); });
}

function niceTicks(lo, hi, count) {
  const span = hi - lo || Math.abs(hi) || 1;
  const raw = span / count;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => span / s <= count) || 10 * mag;
  const ticks = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(Number(v.toPrecision(12)));
  return ticks;
}

function drawChart() {
  const canvas = $("loss-chart");
  const points = jobState.points;
  canvas.dataset.points = String(points.length);
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height;
  const pad = { left: 58, right: 16, top: 16, bottom: 36 };
  ctx.clearRect(0, 0, W, H);
  ctx.font = "12px system-ui, sans-serif";
  ctx.fillStyle = "#5d6675";
  if (!points.length) {
    ctx.fillText("Waiting for the first training step…", pad.left, H / 2);
    return;
  }
  const xMax = Math.max(jobState.total || 0, points[points.length - 1][0], 1);
  const losses = points.map((p) => p[1]);
  let yLo = Math.min(...losses), yHi = Math.max(...losses);
  if (yHi - yLo < 1e-9) { yLo -= 0.5; yHi += 0.5; }
  const margin = 0.05 * (yHi - yLo);
  yLo = Math.max(0, yLo - margin); yHi += margin;
  const x = (step) => pad.left + ((W - pad.left - pad.right) * step) / xMax;
  const y = (loss) => H - pad.bottom - ((H - pad.top - pad.bottom) * (loss - yLo)) / (yHi - yLo);

  ctx.strokeStyle = "#d7dbe2";
  ctx.lineWidth = 1;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (const t of niceTicks(yLo, yHi, 5)) {
    ctx.beginPath(); ctx.moveTo(pad.left, y(t)); ctx.lineTo(W - pad.right, y(t)); ctx.stroke();
    ctx.fillText(String(t), pad.left - 6, y(t));
  }
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  for (const t of niceTicks(0, xMax, 8)) ctx.fillText(String(t), x(t), H - pad.bottom + 6);
  ctx.fillText("step", (W + pad.left) / 2, H - 16);
  ctx.save();
  ctx.translate(14, (H - pad.bottom + pad.top) / 2);
  ctx.rotate(-Math.PI / 2);
  ctx.fillText("loss", 0, -6);
  ctx.restore();

  ctx.strokeStyle = "#1f6feb";
  ctx.lineWidth = 2;
  ctx.beginPath();
  points.forEach(([step, loss], i) => (i ? ctx.lineTo(x(step), y(loss)) : ctx.moveTo(x(step), y(loss))));
  ctx.stroke();
  if (points.length < 60) {
    ctx.fillStyle = "#1f6feb";
    for (const [step, loss] of points) { ctx.beginPath(); ctx.arc(x(step), y(loss), 2.5, 0, 2 * Math.PI); ctx.fill(); }
  }
}

// ------------------------------------------------------------------ wiring
function init() {
  const keyInput = $("api-key");
  keyInput.value = sessionStorage.getItem(KEY_STORAGE) || "";
  keyInput.addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORAGE, keyInput.value.trim());
    if (!$("panel-jobs").hidden) refreshJobs();
  });
  $("tab-detect").addEventListener("click", () => showTab("detect"));
  $("tab-jobs").addEventListener("click", () => showTab("jobs"));
  $("jobs-refresh").addEventListener("click", refreshJobs);

  $("conf").addEventListener("input", () => {
    $("conf-value").textContent = Number($("conf").value).toFixed(2);
    redetectSoon();
  });
  $("model").addEventListener("change", redetectSoon);
  $("file").addEventListener("change", (e) => showFile(e.target.files[0]));
  $("camera-start").addEventListener("click", startCamera);
  $("camera-stop").addEventListener("click", stopCamera);

  const stage = $("stage");
  stage.addEventListener("dragover", (e) => { e.preventDefault(); stage.classList.add("dragging"); });
  stage.addEventListener("dragleave", () => stage.classList.remove("dragging"));
  stage.addEventListener("drop", (e) => {
    e.preventDefault();
    stage.classList.remove("dragging");
    if (e.dataTransfer.files.length) showFile(e.dataTransfer.files[0]);
  });
  document.addEventListener("dragover", (e) => e.preventDefault());  // a photo dropped beside the frame is not opened
  document.addEventListener("drop", (e) => e.preventDefault());
  loadModels();
}

document.addEventListener("DOMContentLoaded", init);
