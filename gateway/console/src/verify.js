// Audit-log verification in the browser, with WebCrypto only:
// - RFC 6962 / RFC 9162 hashing: leaf = SHA-256(0x00 || entry), node = SHA-256(0x01 || l || r),
//   and the inclusion-proof check of RFC 9162 section 2.1.3.2 (as kernel/policy_audit/merkle.py);
// - the C2SP signed note of the checkpoint, Ed25519, with the Go sumdb/note key encoding
//   (as kernel/policy_audit/checkpoint.py).
// Nothing here trusts the server's own verdicts: every hash is recomputed.

const utf8 = new TextEncoder();
const SIG_PREFIX = "\u2014 ";

export function fromBase64(text) {
  if (typeof text !== "string" || !/^[A-Za-z0-9+/]*={0,2}$/.test(text)) {
    throw new Error("not base64");
  }
  const bin = atob(text);
  return Uint8Array.from(bin, (c) => c.charCodeAt(0));
}

export function toHex(bytes) {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

export function equal(a, b) {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

async function sha256(...parts) {
  return new Uint8Array(await crypto.subtle.digest("SHA-256", concat(...parts)));
}

export const leafHash = (entry) => sha256(Uint8Array.of(0), entry);
export const nodeHash = (left, right) => sha256(Uint8Array.of(1), left, right);

/** RFC 9162 2.1.3.2: does `proof` place `leaf` at `index` in the tree (`size`, `root`)? */
export async function verifyInclusion(index, size, leaf, proof, root) {
  // BigInt: JavaScript's bit operators are 32-bit, tree sizes are int64.
  let fn = BigInt(index);
  let sn = BigInt(size) - 1n;
  if (fn < 0n || fn > sn) return false;
  let r = leaf;
  for (const p of proof) {
    if (sn === 0n) return false;
    if (fn & 1n || fn === sn) {
      r = await nodeHash(p, r);
      while (!(fn & 1n) && fn !== 0n) {
        fn >>= 1n;
        sn >>= 1n;
      }
    } else {
      r = await nodeHash(r, p);
    }
    fn >>= 1n;
    sn >>= 1n;
  }
  return sn === 0n && equal(r, root);
}

/** A note verifier key `<name>+<hex key hash>+<base64(0x01 || Ed25519 key)>`. */
export async function parseVerifierKey(vkey) {
  const first = vkey.indexOf("+");
  const second = vkey.indexOf("+", first + 1);
  if (first <= 0 || second < 0) throw new Error("a verifier key is <name>+<hash>+<key>");
  const name = vkey.slice(0, first);
  const hashHex = vkey.slice(first + 1, second).toLowerCase();
  const raw = fromBase64(vkey.slice(second + 1).trim());
  if (raw.length !== 33 || raw[0] !== 1) throw new Error("not an Ed25519 verifier key");
  const publicKey = raw.slice(1);
  const keyHash = (await sha256(utf8.encode(`${name}\n`), Uint8Array.of(1), publicKey)).slice(0, 4);
  if (toHex(keyHash) !== hashHex) throw new Error("the key hash does not match the key's name and bytes");
  return { name, keyHash, keyId: hashHex, publicKey };
}

/**
 * Verify the signed note with `verifier`; return its body. Throws with the
 * reason when the note does not parse or carries no valid signature by it.
 */
export async function openNote(note, verifier) {
  if (!note.endsWith("\n")) throw new Error("a signed note ends with a newline");
  const split = note.lastIndexOf("\n\n");
  if (split < 0) throw new Error("a signed note has a blank line before its signatures");
  const body = note.slice(0, split + 1);
  const key = await crypto.subtle.importKey("raw", verifier.publicKey, { name: "Ed25519" }, false, [
    "verify",
  ]);
  for (const line of note.slice(split + 2, -1).split("\n")) {
    if (!line.startsWith(SIG_PREFIX)) throw new Error(`malformed signature line ${JSON.stringify(line)}`);
    const rest = line.slice(SIG_PREFIX.length);
    const space = rest.lastIndexOf(" ");
    if (rest.slice(0, space) !== verifier.name) continue;
    const blob = fromBase64(rest.slice(space + 1));
    if (blob.length < 5 || !equal(blob.slice(0, 4), verifier.keyHash)) continue;
    const ok = await crypto.subtle.verify({ name: "Ed25519" }, key, blob.slice(4), utf8.encode(body));
    if (!ok) throw new Error(`the signature of ${verifier.name} does not verify`);
    return body;
  }
  throw new Error(`the note carries no signature by ${verifier.name}+${verifier.keyId}`);
}

/** The C2SP tlog-checkpoint body: origin, size, base64 root hash. */
export function parseCheckpoint(body) {
  const lines = body.slice(0, -1).split("\n");
  if (lines.length < 3 || !lines[0]) throw new Error("a checkpoint has an origin, a size and a root line");
  if (!/^(0|[1-9]\d*)$/.test(lines[1])) throw new Error(`bad tree size ${JSON.stringify(lines[1])}`);
  const root = fromBase64(lines[2]);
  if (root.length !== 32) throw new Error("the root hash is not 32 bytes");
  return { origin: lines[0], size: BigInt(lines[1]), root };
}

/**
 * Check one entry end to end. `fetchEvidence` returns what the gateway serves
 * ({entry, checkpoint, proof}); the result lists each check and its outcome.
 * Any exception becomes a failed check: the verdict is never left pending.
 */
export async function verifyEntry(index, fetchEvidence) {
  const checks = [];
  const check = (name, ok, detail) => checks.push({ name, ok, detail });
  try {
    const { checkpointResponse, entryResponse, proofFor } = await fetchEvidence();
    const cp = checkpointResponse.checkpoint || {};
    const verifier = await parseVerifierKey(checkpointResponse.verifierKey || "");
    let body;
    try {
      body = await openNote(cp.signedNote || "", verifier);
      check("Checkpoint signature (Ed25519)", true, `signed by ${verifier.name}+${verifier.keyId}`);
    } catch (err) {
      check("Checkpoint signature (Ed25519)", false, err.message);
      return { ok: false, checks };
    }
    const signed = parseCheckpoint(body);
    check("Checkpoint body", true, `${signed.origin}, tree size ${signed.size}, root ${toHex(signed.root).slice(0, 16)}…`);
    if (BigInt(index) >= signed.size) {
      check("Entry is covered by the checkpoint", false, `entry ${index} is beyond tree size ${signed.size}`);
      return { ok: false, checks };
    }
    const entryBytes = fromBase64(entryResponse.entryBytes || "");
    const leaf = await leafHash(entryBytes);
    const served = fromBase64(entryResponse.leafHash || "");
    check(
      "Leaf hash SHA-256(0x00 || entry bytes)",
      equal(leaf, served),
      equal(leaf, served) ? toHex(leaf) : `recomputed ${toHex(leaf)}, served ${toHex(served)}`,
    );
    const proofResponse = await proofFor(signed.size);
    const proof = (proofResponse.hashes || []).map(fromBase64);
    const included = await verifyInclusion(BigInt(index), signed.size, leaf, proof, signed.root);
    check(
      "Inclusion proof against the signed root (RFC 6962)",
      included,
      included
        ? `${proof.length} hashes recompute the root`
        : `${proof.length} hashes do not recompute the signed root: the entry differs from what was logged`,
    );
  } catch (err) {
    check("Evidence", false, err.message || String(err));
  }
  return { ok: checks.length > 0 && checks.every((c) => c.ok), checks };
}
