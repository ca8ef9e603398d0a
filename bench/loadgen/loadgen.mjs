// WebSocket load generator for bench/service.py: N sessions, each opens a session on /v1/stream and
// sends L steps per message (JSON or binary frames, docs/api.md), waiting for each answer before the
// next. Prints one JSON line: session-steps/s over the measured window, p50/p99 latency, messages.
//   node loadgen.mjs URL MODEL INPUT_SIZE SESSIONS L FRAME DURATION_S WARMUP_S
import WebSocket from "ws";

const [url, model, inputSize, sessions, L, frame, duration, warmup] = process.argv.slice(2);
const n = Number(sessions), steps = Number(L), inSize = Number(inputSize), binary = frame === "binary";

function payloads(seed) {  // 8 messages per client, made before timing starts
  let s = seed * 2654435761 % 4294967296;
  const rnd = () => ((s = (s * 1664525 + 1013904223) % 4294967296) / 4294967296) * 2 - 1;
  const out = [];
  for (let m = 0; m < 8; m++) {
    const rows = [];
    for (let t = 0; t < steps; t++) rows.push(Array.from({ length: inSize }, () => Math.round(rnd() * 1e4) / 1e4));
    if (binary) out.push(new Float32Array(rows.flat()));
    else out.push(JSON.stringify({ type: "steps", steps: rows }));
  }
  return out;
}

function session(i, state) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, binary ? ["psn.binary.v1"] : [], { perMessageDeflate: false });
    const pool = payloads(i + 1);
    let k = 0, t0 = 0, opened = false;
    const send = () => {
      if (state.stop) { ws.close(); return; }
      t0 = performance.now();
      if (binary) {
        const buf = Buffer.alloc(16 + pool[k % 8].byteLength);
        buf.writeUInt32LE(k >>> 0, 0); buf.writeUInt32LE(steps, 4); buf.writeBigInt64LE(-1n, 8);
        Buffer.from(pool[k % 8].buffer).copy(buf, 16);
        ws.send(buf);
      } else ws.send(pool[k % 8]);
      k++;
    };
    ws.on("open", () => ws.send(JSON.stringify({ type: "open", model })));
    ws.on("message", (data, isBinary) => {
      if (!opened) {
        const msg = JSON.parse(data.toString());
        if (msg.type !== "opened") { reject(new Error(JSON.stringify(msg))); return; }
        opened = true;
        state.ready(send);
        return;
      }
      const t1 = performance.now();
      if (binary ? !isBinary : JSON.parse(data.toString()).type !== "steps") {
        reject(new Error(`step failed: ${data.toString().slice(0, 300)}`)); return;
      }
      if (state.measuring) { state.lat.push(t1 - t0); state.count++; }
      send();
    });
    ws.on("close", () => resolve());
    ws.on("error", reject);
  });
}

const state = { stop: false, measuring: false, lat: [], count: 0, starters: [], ready(fn) { this.starters.push(fn); } };
const all = Array.from({ length: n }, (_, i) => session(i, state));
while (state.starters.length < n) await new Promise((r) => setTimeout(r, 10));
for (const go of state.starters) go();
await new Promise((r) => setTimeout(r, Number(warmup) * 1000));
state.measuring = true;
const start = performance.now();
await new Promise((r) => setTimeout(r, Number(duration) * 1000));
state.measuring = false;
const elapsed = (performance.now() - start) / 1000;
state.stop = true;
await Promise.all(all);
state.lat.sort((a, b) => a - b);
const q = (p) => state.lat[Math.min(state.lat.length - 1, Math.floor(p * state.lat.length))] ?? NaN;
console.log(JSON.stringify({ steps_per_s: (state.count * steps) / elapsed, p50_ms: q(0.5), p99_ms: q(0.99),
                             messages: state.count }));
