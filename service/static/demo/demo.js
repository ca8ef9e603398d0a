// psn-stream live demo: streams one sequence over WS /v1/stream, one step per message, and draws
// the input trace, the last layer's spikes and the class scores as each answer arrives.
// Public API only (GET /v1/models, WS /v1/stream) plus the page's own GET /demo/samples/{model}.
// When the server has API keys, the key typed into the page (kept in sessionStorage, this tab only)
// goes as "Authorization: Bearer" on fetch, and as the WebSocket subprotocol "psn.key.<key>" next to
// "psn.json.v1" (a browser cannot set headers on a WebSocket; the server selects psn.json.v1).
"use strict";

const $ = (id) => document.getElementById(id);
const TYPED = "typed";
const KEY_STORE = "psn-api-key";
const state = { models: {}, samples: [], ws: null, run: 0, key: sessionStorage.getItem(KEY_STORE) || "" };

function setStatus(text, kind) {
  $("status").textContent = text;
  $("status").dataset.state = kind;
}

async function getJSON(url) {
  const r = await fetch(url, { headers: state.key ? { Authorization: `Bearer ${state.key}` } : {} });
  const body = await r.json();
  if (!r.ok) {
    const e = new Error(body.error ? body.error.message : `${url}: HTTP ${r.status}`);
    e.status = r.status;
    throw e;
  }
  return body;
}

function setKey() {
  const key = $("key").value.trim();
  if (key === state.key && $("model").length) return;  // the same key, models already loaded
  state.key = key;
  sessionStorage.setItem(KEY_STORE, key);
  init();
}

async function init() {
  stop();
  state.models = {};
  $("model").length = 0;
  $("key").value = state.key;
  try {
    const { models } = await getJSON("/v1/models");
    const streaming = models.filter((m) => m.streams);
    for (const m of streaming) {
      state.models[m.name] = m;
      $("model").add(new Option(`${m.name} (${m.neuron}${m.k ? ", k=" + m.k : ""})`, m.name));
    }
    if (!streaming.length) return setStatus("no streaming model is served", "error");
    const wanted = new URLSearchParams(location.search).get("model");
    if (wanted && state.models[wanted]) $("model").value = wanted;
    await loadModel();
    setStatus("ready", "idle");
  } catch (e) {
    if (e.status === 401) setStatus(`this server needs an API key: enter it above (${e.message})`, "key");
    else setStatus(`could not load models: ${e.message}`, "error");
  }
}

async function loadModel() {
  stop();
  const m = state.models[$("model").value];
  const acc = m.metrics && m.metrics.test_acc_streaming;
  $("model-info").textContent = `input ${JSON.stringify(m.input_shape)} per step, output layer ` +
    `${m.output_shape.reduce((a, b) => a * b, 1)} neurons, ${m.num_classes} classes` +
    (m.dataset ? `, trained on ${m.dataset}` : "") + (acc ? `, streamed test accuracy ${(100 * acc).toFixed(1)}%` : "");
  state.samples = [];
  try {
    state.samples = (await getJSON(`/demo/samples/${encodeURIComponent(m.name)}`)).samples;
  } catch (e) { /* a model without shipped samples: typed input only */ }
  const sel = $("sample");
  sel.length = 0;
  state.samples.forEach((s, i) =>
    sel.add(new Option(`test sample ${i}: label ${s.label_name} (${s.steps.length} steps)`, String(i))));
  sel.add(new Option("type your own", TYPED));
  const first = state.samples[0];
  $("typed").value = first ? JSON.stringify(first.steps.map(roundStep)) : "";
  $("typed-box").hidden = sel.value !== TYPED;
  clearPlots(m);
}

const roundStep = (s) => (Array.isArray(s) ? s.map(roundStep) : Math.round(s * 1e4) / 1e4);

function parseTyped(m) {
  const text = $("typed").value.trim();
  const per = m.input_shape.reduce((a, b) => a * b, 1);
  let flat;
  if (text.startsWith("[")) {
    const steps = JSON.parse(text);
    if (!Array.isArray(steps) || !steps.length) throw new Error("expected a non-empty list of steps");
    return steps;  // the server checks each step's shape and says what it expected
  }
  flat = text.split(/[\s,]+/).filter(Boolean).map(Number);
  if (!flat.length || flat.some((v) => !Number.isFinite(v))) throw new Error("expected numbers");
  if (flat.length % per) throw new Error(`${flat.length} numbers do not fill steps of ${per}`);
  const steps = [];
  for (let i = 0; i < flat.length; i += per) steps.push(reshape(flat.slice(i, i + per), m.input_shape));
  return steps;
}

function reshape(flat, shape) {
  if (shape.length === 1) return flat;
  const size = flat.length / shape[0];
  return Array.from({ length: shape[0] }, (_, i) => reshape(flat.slice(i * size, (i + 1) * size), shape.slice(1)));
}

const flatten = (s) => (Array.isArray(s) ? s.flat(Infinity) : [s]);

// ----- drawing ---------------------------------------------------------------------------------
function clearPlots(m) {
  for (const id of ["input", "raster"]) {
    const c = $(id);
    c.getContext("2d").clearRect(0, 0, c.width, c.height);
  }
  const bars = $("bars");
  bars.textContent = "";
  m.class_names.forEach((name, i) => {
    const label = document.createElement("span");
    label.textContent = name;
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.id = `bar-${i}`;
    bar.appendChild(document.createElement("div"));
    const num = document.createElement("span");
    num.className = "num";
    num.id = `num-${i}`;
    bars.append(label, bar, num);
  });
  for (const id of ["step", "prediction", "label"]) $(id).textContent = "-";
  $("prediction").className = "";
}

function drawInput(steps, upto) {
  const c = $("input"), g = c.getContext("2d");
  const rows = steps.map(flatten);  // (L, F)
  const F = rows[0].length, L = rows.length;
  const all = rows.flat();
  const lo = Math.min(...all), hi = Math.max(...all), span = hi - lo || 1;
  const w = c.width / L;
  g.clearRect(0, 0, c.width, c.height);
  if (F > 12) {  // many features: a heat map, feature x step
    const h = c.height / F;
    for (let t = 0; t <= upto; t++) {
      for (let f = 0; f < F; f++) {
        const v = Math.round(255 * (1 - (rows[t][f] - lo) / span));
        g.fillStyle = `rgb(${v},${v},${Math.min(255, v + 30)})`;
        g.fillRect(t * w, f * h, Math.ceil(w), Math.ceil(h));
      }
    }
    return;
  }
  for (let f = 0; f < F; f++) {  // a line per feature
    g.strokeStyle = `hsl(${(f * 360) / F}, 65%, 45%)`;
    g.lineWidth = 1.5;
    g.beginPath();
    for (let t = 0; t <= upto; t++) {
      const x = (t + 0.5) * w, y = c.height - 6 - ((rows[t][f] - lo) / span) * (c.height - 12);
      t ? g.lineTo(x, y) : g.moveTo(x, y);
    }
    g.stroke();
  }
}

function drawSpikes(spikes, t, L) {
  const c = $("raster"), g = c.getContext("2d");
  const flat = flatten(spikes), N = flat.length;
  const w = c.width / L, h = c.height / N;
  g.fillStyle = "#1d2330";
  flat.forEach((s, n) => { if (s) g.fillRect(t * w + w * 0.15, n * h, Math.max(1, w * 0.7), Math.max(1, h)); });
}

function drawScores(scores) {
  const top = Math.max(...scores);
  const e = scores.map((s) => Math.exp(s - top));
  const sum = e.reduce((a, b) => a + b, 0);
  scores.forEach((s, i) => {
    const p = e[i] / sum;
    const bar = $(`bar-${i}`);
    bar.firstChild.style.width = `${(100 * p).toFixed(1)}%`;
    bar.classList.toggle("top", s === top);
    $(`num-${i}`).textContent = `${(100 * p).toFixed(1)}%`;
  });
}

// ----- streaming -------------------------------------------------------------------------------
function stop() {
  state.run += 1;  // answers of an older run are ignored from now on
  if (state.ws) state.ws.close();
  state.ws = null;
  $("play").disabled = false;
  $("stop").disabled = true;
}

function play() {
  stop();
  const m = state.models[$("model").value];
  const choice = $("sample").value;
  let steps, sample = null;
  try {
    if (choice === TYPED) steps = parseTyped(m);
    else ({ steps } = (sample = state.samples[Number(choice)]));
  } catch (e) {
    return setStatus(`bad input: ${e.message}`, "error");
  }
  clearPlots(m);
  $("label").textContent = sample ? sample.label_name : "(none: typed input)";
  const run = state.run, L = steps.length;
  const proto = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${proto}://${location.host}/v1/stream`,
    state.key ? ["psn.json.v1", `psn.key.${state.key}`] : []);
  state.ws = ws;
  $("play").disabled = true;
  $("stop").disabled = false;
  let next = 0;
  const send = () => ws.send(JSON.stringify({ type: "steps", steps: [steps[next]], start: next }));
  ws.onopen = () => ws.send(JSON.stringify({ type: "open", model: m.name }));
  ws.onmessage = (ev) => {
    if (run !== state.run) return;
    const msg = JSON.parse(ev.data);
    if (msg.type === "opened") {
      setStatus("streaming", "streaming");
      send();
    } else if (msg.type === "steps") {
      for (const out of msg.outputs) {
        drawInput(steps, out.index);
        drawSpikes(out.spikes, out.index, L);
        drawScores(out.scores);
        $("step").textContent = `${out.index + 1} / ${L}`;
        $("prediction").textContent = out.label;
        if (sample) $("prediction").className = out.predicted === sample.label ? "good" : "bad";
      }
      next += msg.outputs.length;
      if (next < L) setTimeout(() => run === state.run && send(), Number($("delay").value));
      else {
        ws.send(JSON.stringify({ type: "close" }));
        setStatus(`done: ${L} steps streamed`, "done");
      }
    } else if (msg.type === "closed") {
      stop();
    } else if (msg.type === "error" || msg.type === "expired") {
      setStatus(`${msg.error.code}: ${msg.error.message}`, "error");
      stop();
    }
  };
  ws.onerror = () => run === state.run && setStatus("WebSocket error", "error");
}

$("model").addEventListener("change", loadModel);
$("key").addEventListener("change", setKey);
$("sample").addEventListener("change", () => { $("typed-box").hidden = $("sample").value !== TYPED; });
$("delay").addEventListener("input", () => { $("delay-ms").textContent = `${$("delay").value} ms`; });
$("play").addEventListener("click", play);
$("stop").addEventListener("click", () => { stop(); setStatus("stopped", "idle"); });
init();
