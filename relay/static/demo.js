// The wavespeed-relay demo page: three streams through the relay, read as they arrive.
//
// Every request goes to this page's own origin (the relay); none carries a key. Each body
// is read with a ReadableStream reader and parsed as Server-Sent Events here, so what the
// page shows is what the relay forwarded, chunk by chunk.
"use strict";

const SAMPLE_RATE = 16000; // the mock's speech: 16 kHz, 16-bit little-endian, mono PCM
const WAVEFORM_SECONDS = 3; // the waveform's width in seconds (it rescales past this)

const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------------------------------
// Stream figures: one table row per stream, updated on every chunk.

class Figures {
  constructor(name) {
    this.row = document.createElement("tr");
    this.row.dataset.stream = name;
    this.cells = {};
    for (const key of ["name", "status", "ttfb", "chunks", "bytes", "duration", "id"]) {
      const cell = document.createElement("td");
      if (["ttfb", "chunks", "bytes", "duration"].includes(key)) cell.className = "num";
      if (key === "id") cell.className = "id";
      this.cells[key] = cell;
      this.row.append(cell);
    }
    this.cells.name.textContent = name;
    $("figures-body").append(this.row);
    this.started = performance.now();
    this.firstByte = null;
    this.chunks = 0;
    this.bytes = 0;
    this.status("connecting");
    this.render();
  }

  status(text, kind = "") {
    this.cells.status.textContent = text;
    this.cells.status.className = kind;
  }

  headers(response) {
    this.cells.id.textContent = response.headers.get("X-Request-ID") || "";
    this.status(`${response.status} streaming`);
  }

  chunk(size) {
    if (this.firstByte === null) this.firstByte = performance.now();
    this.chunks += 1;
    this.bytes += size;
    this.render();
  }

  finish(text, kind) {
    this.ended = performance.now();
    this.status(text, kind);
    this.render();
  }

  render() {
    const ms = (t) => `${Math.round(t)} ms`;
    this.cells.ttfb.textContent = this.firstByte === null ? "…" : ms(this.firstByte - this.started);
    this.cells.chunks.textContent = String(this.chunks);
    this.cells.bytes.textContent = this.bytes.toLocaleString("en");
    this.cells.duration.textContent = ms((this.ended ?? performance.now()) - this.started);
  }
}

// ---------------------------------------------------------------------------------------
// Requests and SSE parsing.

// POST a JSON body to the relay; resolve with the response once its headers arrived.
// A non-2xx answer is the relay's (or the provider's) JSON envelope: raise its message.
async function post(path, body, figures) {
  const response = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
    body: JSON.stringify(body),
  });
  figures.headers(response);
  if (!response.ok) {
    const text = await response.text();
    figures.chunk(text.length);
    let message = text;
    try {
      const envelope = JSON.parse(text);
      message = `${envelope.message}${envelope.data?.error ? ` (${envelope.data.error})` : ""}`;
    } catch (_) { /* not JSON: show it as it came */ }
    throw new Error(`HTTP ${response.status}: ${message}`);
  }
  return response;
}

// Yield the data of each SSE event as soon as its terminating blank line has arrived.
// A stream cut mid-body makes reader.read() reject: that error propagates to the caller.
async function* sseEvents(response, figures) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    figures.chunk(value.byteLength);
    buffer = (buffer + decoder.decode(value, { stream: true })).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data) yield data;
    }
  }
}

function setState(id, state) {
  $(id).dataset.state = state;
}

// ---------------------------------------------------------------------------------------
// The three streams.

async function streamAnswer(prompt) {
  const figures = new Figures("any-llm answer");
  const answer = $("answer");
  answer.textContent = "";
  setState("llm", "streaming");
  try {
    const response = await post("/api/v3/wavespeed-ai/any-llm/stream", { prompt }, figures);
    let finished = false;
    for await (const data of sseEvents(response, figures)) {
      if (data === "[DONE]") {
        finished = true;
        continue;
      }
      const event = JSON.parse(data);
      const token = event.choices?.[0]?.delta?.content;
      if (token) answer.append(document.createTextNode(token));
    }
    if (!finished) throw new Error("the stream ended without [DONE]");
    figures.finish("done", "ok");
    setState("llm", "done");
  } catch (error) {
    figures.finish(`✗ ${error.message}`, "bad");
    setState("llm", "error");
  }
}

function setProgress(percent) {
  const value = Math.max(0, Math.min(100, Math.round(percent)));
  $("progress").setAttribute("aria-valuenow", String(value));
  $("progress-fill").style.width = `${value}%`;
  $("progress-label").textContent = `${value}%`;
}

async function streamTask(prompt) {
  const figures = new Figures("music-02 progress");
  setProgress(0);
  $("task-output").textContent = "";
  setState("task", "streaming");
  try {
    const body = { prompt, lyrics: "[verse] streaming, byte by byte", stream: true };
    const response = await post("/api/v3/minimax/music-02", body, figures);
    let complete = false;
    for await (const data of sseEvents(response, figures)) {
      const event = JSON.parse(data);
      if (event.type === "progress") setProgress(event.percentage);
      if (event.type === "error") throw new Error(event.error || event.message || "task failed");
      if (event.type === "complete") {
        complete = true;
        setProgress(100);
        $("task-output").textContent = `complete: ${(event.outputs || []).join(", ")}`;
      }
    }
    if (!complete) throw new Error("the stream ended without a complete event");
    figures.finish("done", "ok");
    setState("task", "done");
  } catch (error) {
    figures.finish(`✗ ${error.message}`, "bad");
    setState("task", "error");
  }
}

// Audio playback: each chunk becomes an AudioBuffer scheduled right after the previous one,
// so the sound starts with the first chunk and plays on while the rest arrives.
class Player {
  constructor(enabled) {
    this.context = null;
    this.next = 0;
    if (!enabled) return;
    try {
      this.context = new AudioContext();
    } catch (_) {
      this.context = null; // no audio output here: the waveform still shows what arrived
    }
  }

  play(samples) {
    if (!this.context) return;
    const buffer = this.context.createBuffer(1, samples.length, SAMPLE_RATE);
    buffer.getChannelData(0).set(samples);
    const source = this.context.createBufferSource();
    source.buffer = buffer;
    source.connect(this.context.destination);
    const at = Math.max(this.context.currentTime + 0.05, this.next);
    source.start(at);
    this.next = at + buffer.duration;
  }
}

function pcmFromHex(hex) {
  const samples = new Float32Array(hex.length / 4);
  for (let i = 0; i < samples.length; i++) {
    const lo = parseInt(hex.substr(i * 4, 2), 16);
    const hi = parseInt(hex.substr(i * 4 + 2, 2), 16);
    samples[i] = (((hi << 8) | lo) << 16 >> 16) / 32768; // little-endian signed 16-bit
  }
  return samples;
}

// The waveform of the audio received so far: one min/max column per 10 ms.
class Waveform {
  constructor(canvas) {
    this.canvas = canvas;
    this.peaks = [];
    this.draw();
  }

  add(samples) {
    const step = SAMPLE_RATE / 100;
    for (let i = 0; i < samples.length; i += step) {
      let lo = 0, hi = 0;
      for (const s of samples.subarray(i, i + step)) { lo = Math.min(lo, s); hi = Math.max(hi, s); }
      this.peaks.push([lo, hi]);
    }
    this.draw();
  }

  draw() {
    const { width, height } = this.canvas;
    const g = this.canvas.getContext("2d");
    g.clearRect(0, 0, width, height);
    g.fillStyle = "#e3e6ee";
    g.fillRect(0, height / 2, width, 1);
    const columns = Math.max(WAVEFORM_SECONDS * 100, this.peaks.length);
    const w = width / columns;
    g.fillStyle = "#4f46e5";
    this.peaks.forEach(([lo, hi], x) => {
      const top = (0.5 - hi * 1.8) * height;
      const bottom = (0.5 - lo * 1.8) * height;
      g.fillRect(x * w, top, Math.max(1, w - 0.5), Math.max(1, bottom - top));
    });
  }
}

async function streamSpeech(prompt) {
  const figures = new Figures("speech-02-hd audio");
  const status = $("speech-status");
  const waveform = new Waveform($("waveform"));
  const player = new Player($("sound").checked);
  let seconds = 0;
  setState("speech", "streaming");
  status.textContent = "Waiting for audio…";
  try {
    const body = {
      text: prompt, voice_id: "Wise_Woman", emotion: "happy", speed: 1, volume: 1, pitch: 0,
      english_normalization: false, enable_sync_mode: false,
    };
    const response = await post("/api/v3/minimax/speech-02-hd/stream", body, figures);
    let final = null;
    for await (const data of sseEvents(response, figures)) {
      const event = JSON.parse(data);
      if (event.base_resp && event.base_resp.status_code !== 0) {
        throw new Error(event.base_resp.status_msg || `status_code ${event.base_resp.status_code}`);
      }
      // MiniMax may repeat the whole audio in the final (status 2) event: play only chunks.
      if (event.data?.status === 2) {
        final = event;
        continue;
      }
      const hex = event.data?.audio;
      if (!hex) continue;
      const samples = pcmFromHex(hex);
      player.play(samples);
      waveform.add(samples);
      seconds += samples.length / SAMPLE_RATE;
      const where = player.context ? "playing as it arrives" : "no audio output here";
      status.textContent = `${seconds.toFixed(1)} s of audio received · ${where}`;
    }
    if (!final) throw new Error("the stream ended without the final status event");
    const info = final.extra_info || {};
    status.textContent = `${seconds.toFixed(1)} s of audio received (${info.audio_format || "pcm"}, ` +
      `${info.audio_sample_rate || SAMPLE_RATE} Hz) · done`;
    figures.finish("done", "ok");
    setState("speech", "done");
  } catch (error) {
    status.textContent = `${seconds.toFixed(1)} s of audio received, then: ${error.message}`;
    figures.finish(`✗ ${error.message}`, "bad");
    setState("speech", "error");
  }
}

// ---------------------------------------------------------------------------------------

async function runAll(event) {
  event.preventDefault();
  const button = $("run");
  button.disabled = true;
  $("figures-body").textContent = "";
  const prompt = $("prompt").value;
  try {
    await Promise.all([streamAnswer(prompt), streamTask(prompt), streamSpeech(prompt)]);
  } finally {
    button.disabled = false;
  }
}

$("controls").addEventListener("submit", runAll);
