// Example upload app beside the watcher sidecar: no dependencies, Node.js 20 built-ins only.
//
//   POST /upload?name=report.pdf   (raw body)   -> stores the upload, answers with the verdict
//   GET  /files/<id>/verdict                    -> the verdict (pending, clean, infected, ...)
//   GET  /files/<id>                            -> the bytes, only once delivered to processed
//   GET  /healthz                               -> 200, with the scanner's readiness (its /readyz)
//   POST /webhooks/watcher                      -> the watcher's signed verdict events (be told)
//
// Two ways to learn a verdict: wait on the watcher's API (GET /v1/files/<path>?wait=N, as the
// upload handler does), or be told: with WATCHER_WEBHOOK_URL=http://app:3000/webhooks/watcher
// and the same secret on both sides (WATCHER_WEBHOOK_SECRET), the watcher POSTs each verdict.
// Each event is checked here: HMAC-SHA256 over "<timestamp>.<raw body>" (header
// watcher-signature: v1=<hex>), a timestamp within WEBHOOK_TOLERANCE_S of our clock (an old
// request replayed is refused), and its id not seen before (a redelivery or a replay within the
// window is acknowledged, not processed twice).
//
// The app writes into the shared `uploads` volume under a temporary name the watcher ignores
// (".<name>.part"), then renames it: the watcher only ever sees complete files. It serves files
// only from the `processed` volume (mounted read-only), which holds nothing but clean files. It
// never talks to clamd (which has no authentication and is not reachable from here): only to the
// watcher's HTTP API.
'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const fsp = require('node:fs/promises');
const http = require('node:http');
const path = require('node:path');
const { pipeline } = require('node:stream/promises');
const { Transform } = require('node:stream');

const PORT = Number(process.env.PORT || 3000);
const UPLOADS_DIR = process.env.UPLOADS_DIR || '/data/uploads';
const PROCESSED_DIR = process.env.PROCESSED_DIR || '/data/processed';
const WATCHER_URL = (process.env.WATCHER_URL || 'http://scanner:9090').replace(/\/$/, '');
const VERDICT_WAIT_S = Number(process.env.VERDICT_WAIT_S || 30);
// Keep in step with clamd's MaxFileSize/StreamMaxLength (docker/clamav/clamd.conf).
const MAX_UPLOAD_BYTES = Number(process.env.MAX_UPLOAD_BYTES || 100 * 1024 * 1024);

const WEBHOOK_SECRET = process.env.WATCHER_WEBHOOK_SECRET || '';
const WEBHOOK_TOLERANCE_S = Number(process.env.WEBHOOK_TOLERANCE_S || 300);
const WEBHOOK_MAX_BYTES = 1024 * 1024;

const ID_RE = /^[0-9a-f]{16}-[A-Za-z0-9._-]{1,100}$/;
// Verdicts the watcher pushed, by upload path; event ids already processed, with their time.
const pushed = new Map();
const seenEvents = new Map();

function log(event, fields = {}) {
  process.stdout.write(JSON.stringify({ time: new Date().toISOString(), event, ...fields }) + '\n');
}

function send(res, status, body, headers = {}) {
  const data = typeof body === 'string' ? body : JSON.stringify(body) + '\n';
  res.writeHead(status, {
    'content-type': typeof body === 'string' ? 'text/html; charset=utf-8' : 'application/json',
    'content-length': Buffer.byteLength(data),
    ...headers,
  });
  res.end(data);
}

// A stored name: random prefix + a conservative version of the client's name (never trusted).
function storedName(clientName) {
  const base = path.basename(String(clientName || 'upload')).replace(/[^A-Za-z0-9._-]/g, '_');
  const safe = base.replace(/^[._-]+/, '').slice(0, 100) || 'upload';
  return `${crypto.randomBytes(8).toString('hex')}-${safe}`;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const exists = (p) => fsp.access(p).then(() => true, () => false);

// Ask the watcher (GET /v1/files/<path>?wait=N). If its HTTP API is unreachable, fall back to
// what the shared volumes show: delivered to processed means clean; anything else stays pending
// (the app cannot see the quarantine, by design).
async function verdict(id, waitS) {
  try {
    const url = `${WATCHER_URL}/v1/files/${encodeURIComponent(id)}?wait=${waitS}`;
    const res = await fetch(url, { signal: AbortSignal.timeout((waitS + 5) * 1000) });
    if (res.ok) return { source: 'watcher', ...(await res.json()) };
    if (res.status !== 404) throw new Error(`watcher answered ${res.status}`);
  } catch (err) {
    log('verdict.api_unavailable', { reason: String(err.message || err) });
  }
  const deadline = Date.now() + waitS * 1000;
  for (;;) {
    if (await exists(path.join(PROCESSED_DIR, id))) return { source: 'volume', state: 'clean' };
    if (Date.now() >= deadline) return { source: 'volume', state: 'pending' };
    await sleep(250);
  }
}

async function handleUpload(req, res, url) {
  const id = storedName(url.searchParams.get('name'));
  const part = path.join(UPLOADS_DIR, `.${id}.part`);
  let size = 0;
  const limit = new Transform({
    transform(chunk, _enc, cb) {
      size += chunk.length;
      cb(size > MAX_UPLOAD_BYTES ? Object.assign(new Error('too large'), { code: 'E2BIG' }) : null, chunk);
    },
  });
  try {
    await pipeline(req, limit, fs.createWriteStream(part, { flags: 'wx', mode: 0o640 }));
    await fsp.rename(part, path.join(UPLOADS_DIR, id)); // complete: now the watcher may take it
  } catch (err) {
    await fsp.rm(part, { force: true });
    if (err.code === 'E2BIG') return send(res, 413, { error: `larger than ${MAX_UPLOAD_BYTES} bytes` });
    throw err;
  }
  log('upload.stored', { id, size });
  const v = await verdict(id, VERDICT_WAIT_S);
  log('upload.verdict', { id, state: v.state });
  // clean: 201; not decided yet (pending, or not seen yet: unknown): 202; anything else: 422.
  const status = v.state === 'clean' ? 201 : ['pending', 'unknown'].includes(v.state) ? 202 : 422;
  send(res, status, { id, size, verdict: v });
}

// Verify one webhook request; returns the event, or an HTTP status and reason to refuse it.
function verifyWebhook(headers, raw, nowS) {
  if (!WEBHOOK_SECRET) return { status: 503, reason: 'webhooks not configured (WATCHER_WEBHOOK_SECRET)' };
  const timestamp = Number(headers['watcher-timestamp']);
  if (!Number.isInteger(timestamp)) return { status: 401, reason: 'no timestamp' };
  if (Math.abs(nowS - timestamp) > WEBHOOK_TOLERANCE_S) return { status: 401, reason: 'timestamp outside the window' };
  const mac = crypto.createHmac('sha256', WEBHOOK_SECRET).update(`${timestamp}.`).update(raw).digest('hex');
  const expected = Buffer.from(`v1=${mac}`);
  const given = Buffer.from(String(headers['watcher-signature'] || ''));
  if (given.length !== expected.length || !crypto.timingSafeEqual(given, expected)) {
    return { status: 401, reason: 'bad signature' };
  }
  let event;
  try {
    event = JSON.parse(raw.toString('utf8'));
  } catch {
    return { status: 400, reason: 'not JSON' };
  }
  if (!event || typeof event.id !== 'string' || event.id !== headers['watcher-event-id'] || !event.file) {
    return { status: 400, reason: 'not a watcher event' };
  }
  return { event };
}

async function readBody(req, limit) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > limit) throw Object.assign(new Error('too large'), { code: 'E2BIG' });
    chunks.push(chunk);
  }
  return Buffer.concat(chunks);
}

async function handleWebhook(req, res) {
  let raw;
  try {
    raw = await readBody(req, WEBHOOK_MAX_BYTES);
  } catch (err) {
    if (err.code === 'E2BIG') return send(res, 413, { error: 'too large' });
    throw err;
  }
  const nowS = Math.floor(Date.now() / 1000);
  const { event, status, reason } = verifyWebhook(req.headers, raw, nowS);
  if (!event) {
    log('webhook.refused', { status, reason });
    return send(res, status, { error: reason });
  }
  // Ids are remembered for twice the window: anything older is refused by its timestamp.
  for (const [id, at] of seenEvents) if (nowS - at > 2 * WEBHOOK_TOLERANCE_S) seenEvents.delete(id);
  if (seenEvents.has(event.id)) {
    log('webhook.duplicate', { id: event.id });
    return send(res, 200, { duplicate: true });
  }
  seenEvents.set(event.id, nowS);
  const file = event.file;
  pushed.set(file.path, { source: 'webhook', ...file });
  // Here the app would act: mark the upload usable (clean) or tell its user (infected, ...).
  log('webhook.verdict', { id: event.id, type: event.type, path: file.path, state: file.state });
  send(res, 200, { ok: true });
}

async function handleDownload(res, id) {
  const file = path.join(PROCESSED_DIR, id);
  const stat = await fsp.stat(file).catch(() => null);
  if (!stat || !stat.isFile()) return send(res, 404, { error: 'not delivered (pending or rejected)' });
  res.writeHead(200, {
    'content-type': 'application/octet-stream',
    'content-length': stat.size,
    'content-disposition': `attachment; filename="${id.slice(17)}"`,
  });
  await pipeline(fs.createReadStream(file), res);
}

// The scanner's readiness (GET /readyz: clamd answers, definitions fresh, directories writable):
// 'ready', 'not_ready' (with the failing checks) or 'unreachable'.
async function scannerReadiness() {
  try {
    const res = await fetch(`${WATCHER_URL}/readyz`, { signal: AbortSignal.timeout(3000) });
    const body = await res.json().catch(() => ({}));
    if (res.ok) return { scanner: 'ready' };
    return { scanner: 'not_ready', failing: Array.isArray(body.failing) ? body.failing : [] };
  } catch {
    return { scanner: 'unreachable' };
  }
}

const PAGE = `<!doctype html><meta charset="utf-8"><title>Upload</title>
<h1>Upload a file</h1><input type="file" id="f"> <button id="b">Upload</button><pre id="out"></pre>
<script>
b.onclick = async () => {
  const file = f.files[0]; if (!file) return;
  out.textContent = 'uploading and scanning...';
  const r = await fetch('/upload?name=' + encodeURIComponent(file.name), { method: 'POST', body: file });
  out.textContent = r.status + ' ' + JSON.stringify(await r.json(), null, 2);
};
</script>`;

const server = http.createServer(async (req, res) => {
  const url = new URL(req.url, 'http://app');
  try {
    if (req.method === 'GET' && url.pathname === '/') return send(res, 200, PAGE);
    if (req.method === 'GET' && url.pathname === '/healthz') {
      // Liveness of the app itself: the scanner's readiness is reported, not required (uploads
      // wait in the volume while the scanner is down).
      return send(res, 200, { status: 'ok', ...(await scannerReadiness()) });
    }
    if (req.method === 'POST' && url.pathname === '/webhooks/watcher') return await handleWebhook(req, res);
    if ((req.method === 'POST' || req.method === 'PUT') && url.pathname === '/upload') {
      return await handleUpload(req, res, url);
    }
    const m = url.pathname.match(/^\/files\/([^/]+)(\/verdict)?$/);
    if (req.method === 'GET' && m) {
      const id = decodeURIComponent(m[1]);
      if (!ID_RE.test(id)) return send(res, 400, { error: 'bad id' });
      if (m[2]) return send(res, 200, { id, verdict: pushed.get(id) || (await verdict(id, 0)) });
      return await handleDownload(res, id);
    }
    send(res, 404, { error: 'not found' });
  } catch (err) {
    log('request.error', { path: url.pathname, error: String(err.message || err) });
    if (!res.headersSent) send(res, 500, { error: 'internal error' });
    else res.destroy();
  }
});

server.requestTimeout = (VERDICT_WAIT_S + 60) * 1000;
server.listen(PORT, () => log('app.ready', { port: PORT, uploads: UPLOADS_DIR, processed: PROCESSED_DIR }));
for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => server.close(() => process.exit(0)));
