// Ask watcher for an upload's verdict, waiting up to `waitS` seconds for the scan to finish.
// Node 18+ (global fetch). Run: node wait-for-verdict.mjs <path relative to uploads> [base URL]
// Exit 0 clean, 1 infected, 2 anything else (pending after the wait, unscannable, errors).
import { pathToFileURL } from "node:url";

export async function waitForVerdict(relPath, { base = "http://127.0.0.1:9090", waitS = 30 } = {}) {
  const path = relPath.split("/").map(encodeURIComponent).join("/");
  const res = await fetch(`${base}/v1/files/${path}?wait=${waitS}`, {
    signal: AbortSignal.timeout((waitS + 5) * 1000),
  });
  if (!res.ok) throw new Error(`watcher answered ${res.status}: ${await res.text()}`);
  return res.json(); // {path, state, location, sha256, signature, reason, scanned_at, allowlisted}
}

if (import.meta.url === pathToFileURL(process.argv[1]).href) {
  const [relPath, base = process.env.WATCHER_URL] = process.argv.slice(2);
  try {
    const verdict = await waitForVerdict(relPath, base ? { base } : {});
    console.log(JSON.stringify(verdict));
    process.exit({ clean: 0, infected: 1 }[verdict.state] ?? 2);
  } catch (err) {
    console.error(`watcher: ${err.message}`);
    process.exit(2);
  }
}
