// In-browser verification of the audit log: the same checks as civicdp.audit.bundle.verify_bundle.
// leaf = SHA-256(0x00 || entry bytes); node = SHA-256(0x01 || left || right) (RFC 9162); checkpoints
// are C2SP signed notes whose Ed25519 signatures are checked with WebCrypto. The tree's SHA-256 is
// the vendored @noble/hashes (synchronous: WebCrypto's digest costs a promise per hash, ~50x slower
// over 200,000 small hashes); the Ed25519 signatures use WebCrypto.
"use strict";
(function () {
  const subtle = crypto.subtle;
  const PAGE = 20000;
  const spent = { fetching: 0, hashing: 0 };  // where the time goes: waiting for entries, hashing

  function b64(text) { return Uint8Array.from(atob(text), (c) => c.charCodeAt(0)); }
  function hex(bytes) { return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join(""); }
  function equal(a, b) { return a.length === b.length && a.every((v, i) => v === b[i]); }
  const sha = (bytes) => nobleHashes.sha256(bytes);

  function leaves(buffer, out) {
    // Split at newlines; each line is the exact bytes that were hashed.
    const data = new Uint8Array(buffer);
    let start = 0, count = 0;
    for (let i = 0; i < data.length; i++) {
      if (data[i] !== 10) continue;
      const input = new Uint8Array(i - start + 1);
      input.set(data.subarray(start, i), 1);  // input[0] = 0x00
      out.push(sha(input));
      count += 1;
      start = i + 1;
    }
    if (start !== data.length) throw new Error("the entries do not end with a newline: cut off or edited");
    return count;
  }

  function node(left, right) {
    const input = new Uint8Array(65);
    input[0] = 1; input.set(left, 1); input.set(right, 33);
    return sha(input);
  }

  function levelsOf(leafHashes) {
    // levels[h][i]: hash of the perfect subtree of leaves [i*2^h, (i+1)*2^h).
    const levels = [leafHashes];
    let level = leafHashes;
    while (level.length > 1) {
      const pairs = [];
      for (let i = 0; i + 1 < level.length; i += 2) pairs.push(node(level[i], level[i + 1]));
      level = pairs;
      levels.push(level);
    }
    return levels;
  }

  function rangeHash(levels, start, end) {
    const size = end - start;
    if (size <= 0) return sha(new Uint8Array(0));
    if ((size & (size - 1)) === 0 && start % size === 0) return levels[Math.log2(size)][start / size];
    let k = 1;
    while (k * 2 < size) k *= 2;  // the largest power of two below size
    return node(rangeHash(levels, start, start + k), rangeHash(levels, start + k, end));
  }

  function parseCheckpoint(text) {
    const at = text.indexOf("\n\n");
    if (at < 0) throw new Error("a checkpoint has a body, an empty line, then signature lines");
    const body = text.slice(0, at + 1);
    const lines = body.slice(0, -1).split("\n");
    if (lines.length < 3 || !/^(0|[1-9][0-9]*)$/.test(lines[1])) throw new Error("not a checkpoint body");
    const signatures = text.slice(at + 2).split("\n").filter((l) => l.startsWith("\u2014 ")).map((line) => {
      const rest = line.slice(2);
      const cut = rest.lastIndexOf(" ");
      const raw = b64(rest.slice(cut + 1));
      return { name: rest.slice(0, cut), keyId: raw.slice(0, 4), blob: raw.slice(4) };
    });
    return { origin: lines[0], size: Number(lines[1]), root: b64(lines[2]), body: new TextEncoder().encode(body), signatures };
  }

  async function parseKey(text) {
    const parts = text.trim().split("+");
    if (parts.length < 3) throw new Error("a public key looks like name+1a2b3c4d+AbC...=");
    const raw = b64(parts.slice(2).join("+"));
    if (raw[0] !== 1 || raw.length !== 33) throw new Error("not an Ed25519 verifier key");
    const key = await subtle.importKey("raw", raw.slice(1), { name: "Ed25519" }, false, ["verify"]);
    return { name: parts[0], id: parts[1], key };
  }

  async function signedBy(checkpoint, keys) {
    for (const key of keys) {
      for (const sig of checkpoint.signatures) {
        if (sig.name === key.name && hex(sig.keyId) === key.id &&
            await subtle.verify({ name: "Ed25519" }, key.key, sig.blob, checkpoint.body)) return key;
      }
    }
    return null;
  }

  async function fromServer(say) {
    // The live log: every entry's exact bytes, every checkpoint the server holds.
    const held = await (await fetch("/console/audit-log/checkpoints", { credentials: "same-origin" })).json();
    const hashes = [];
    const page = (after) => fetch(`/console/audit-log/entries.jsonl?after=${after}&limit=${PAGE}`, { credentials: "same-origin" })
      .then((answer) => {
        if (!answer.ok) throw new Error(`the server answered ${answer.status} for the entries`);
        return answer.arrayBuffer();
      });
    // The next page is fetched while this one is hashed (entry numbers have no gaps).
    let pending = page(-1);
    for (let after = -1; ;) {
      let mark = performance.now();
      const body = await pending;
      spent.fetching += performance.now() - mark;
      pending = page(after + PAGE);
      mark = performance.now();
      const got = leaves(body, hashes);
      spent.hashing += performance.now() - mark;
      say(`hashed ${hashes.length.toLocaleString()} entries…`);
      if (got < PAGE) break;
      after = hashes.length - 1;
    }
    pending.catch(() => {});  // the page after the last one is not needed
    return { hashes, checkpoints: held.checkpoints, live: true };
  }

  async function fromBundle(file) {
    // An exported bundle: entries.jsonl and checkpoints/*.txt, as `civicdp audit verify` reads them.
    let mark = performance.now();
    const files = await window.civicdpUnzip(await file.arrayBuffer());
    spent.fetching += performance.now() - mark;
    const entries = files.get("entries.jsonl");
    if (!entries) throw new Error("the bundle has no entries.jsonl");
    const hashes = [];
    mark = performance.now();
    leaves(entries.buffer.slice(entries.byteOffset, entries.byteOffset + entries.byteLength), hashes);
    spent.hashing += performance.now() - mark;
    const decoder = new TextDecoder();
    const names = [...files.keys()].filter((n) => n.startsWith("checkpoints/")).sort();
    return { hashes, checkpoints: names.map((n) => decoder.decode(files.get(n))), live: false };
  }

  async function run(say) {
    const keys = [];
    for (const line of document.getElementById("public-key").value.split("\n")) if (line.trim()) keys.push(await parseKey(line));
    if (!keys.length) throw new Error("give the log's public key");
    const chosen = document.getElementById("bundle").files[0];
    const { hashes, checkpoints, live } = chosen ? await fromBundle(chosen) : await fromServer(say);
    const held = { checkpoints };
    let mark = performance.now();
    const levels = levelsOf(hashes);
    spent.hashing += performance.now() - mark;
    const lines = [];
    let origin = null;
    for (const text of held.checkpoints) {
      const c = parseCheckpoint(text);
      if (!await signedBy(c, keys)) return { ok: false, lines: [`TAMPERED: the checkpoint of size ${c.size} is not signed by the public key given`] };
      if (origin !== null && c.origin !== origin) return { ok: false, lines: [`TAMPERED: the checkpoint of size ${c.size} names another log`] };
      origin = c.origin;
      if (c.size > hashes.length) return { ok: false, lines: [`TAMPERED: a checkpoint signs ${c.size} entries but there are only ${hashes.length}: entries were removed`] };
      if (!equal(rangeHash(levels, 0, c.size), c.root)) return { ok: false, lines: [`TAMPERED: the entries do not match the signed checkpoint of size ${c.size}: an entry before number ${c.size} was changed, removed, inserted or reordered`] };
      lines.push(`checkpoint of size ${c.size.toLocaleString()}: signature and root verified`);
    }
    if (!held.checkpoints.length) return { ok: false, lines: ["no signed checkpoint yet: nothing vouches for the entries"] };
    const head = parseCheckpoint(held.checkpoints[held.checkpoints.length - 1]);
    const trustedText = document.getElementById("trusted").value.trim();
    if (trustedText) {
      const t = parseCheckpoint(trustedText.replace(/\r/g, "") + "\n");
      if (!await signedBy(t, keys)) return { ok: false, lines: ["TAMPERED: your checkpoint is not signed by the public key given"] };
      if (t.size > hashes.length) return { ok: false, lines: [`TAMPERED: you hold a checkpoint of ${t.size} entries but the log has ${hashes.length}: it was truncated or rolled back`] };
      if (!equal(rangeHash(levels, 0, t.size), t.root)) return { ok: false, lines: [`TAMPERED: the first ${t.size} entries do not match the checkpoint you hold: the history you saw was rewritten`] };
      lines.push(`consistent with your checkpoint of size ${t.size.toLocaleString()}: the log only grew since`);
    }
    const beyond = hashes.length - head.size;
    if (!live && beyond > 0) return { ok: false, lines: [`TAMPERED: the bundle holds ${beyond} entries after its last checkpoint; nothing signed vouches for them: entries were added`] };
    lines.unshift(`OK: ${head.size.toLocaleString()} entries form the tree whose root the newest checkpoint signs` +
                  (beyond > 0 ? ` (${beyond.toLocaleString()} newer entries are not signed yet)` : ""));
    return { ok: true, lines };
  }

  document.addEventListener("DOMContentLoaded", () => {
    const form = document.getElementById("verify-form");
    const result = document.getElementById("verify-result");
    const progress = document.getElementById("verify-progress");
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      result.className = "hidden";
      const started = performance.now();
      let outcome;
      try { outcome = await run((text) => { progress.textContent = text; }); }
      catch (error) { outcome = { ok: false, lines: [`could not verify: ${error.message}`] }; }
      const elapsed = performance.now() - started;
      document.getElementById("verify-time").textContent =
        `${Math.round(elapsed)} ms (waiting for entries ${Math.round(spent.fetching)} ms, hashing ${Math.round(spent.hashing)} ms)`;
      spent.fetching = spent.hashing = 0;
      result.replaceChildren(...outcome.lines.map((line) => { const p = document.createElement("p"); p.textContent = line; return p; }));
      result.className = outcome.ok ? "ok" : "refusal";
      result.dataset.outcome = outcome.ok ? "verified" : "tampered";
      progress.textContent = "";
    });
  });
})();
