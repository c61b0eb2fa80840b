// The node side of genesis_pgflow's report channel: a node:test reporter that signs one line per
// test on the descriptor GENESIS_REPORT_FD, with the key read once from GENESIS_KEY_FD.
//
// It runs in the one process where reporters/genesis_node_entry.mjs imports the test files (not
// `node --test`, whose parent counts events parsed from each child's stdout, which test code can
// forge). Node imports this module first (--import), before any code under test loads, so the key
// pipe is drained and closed before a test can read it. The pipes belong to root, so that no process
// of the sandbox's uid can open them again through /proc/<pid>/fd; test code may write to the
// report descriptor, but cannot sign a line. Lines are those of reporters/genesis_pytest_plugin.py
// (kinds start, result, end), checked by suite.py.
//
// Residual risk (documented in the README): the code under test shares this process, so it can
// tamper with it (rewrite the built-ins and prototypes the test runner and this reporter use, or
// read the key from memory), as a conftest can inside pytest.
import crypto from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const createHmac = crypto.createHmac;
const writeSync = fs.writeSync;
const stringify = JSON.stringify;
const ENTRY = path.join(path.dirname(fileURLToPath(import.meta.url)), "genesis_node_entry.mjs");

let key = null;
let reportFd = null;
let problem = null;
try {
  const keyFd = Number(process.env.GENESIS_KEY_FD);
  const raw = fs.readFileSync(keyFd);
  fs.closeSync(keyFd);
  // hex decoded by hand: no string copy of the key is left in the heap the tests share
  const nibble = (c) => (c >= 48 && c <= 57 ? c - 48 : c >= 97 && c <= 102 ? c - 87 : NaN);
  key = Buffer.alloc(32);
  for (let i = 0; i < 32; i += 1) key[i] = nibble(raw[2 * i]) * 16 + nibble(raw[2 * i + 1]);
  if (raw.length < 64 || raw.subarray(0, 64).some((c) => Number.isNaN(nibble(c)))) key = null;
  raw.fill(0);
  reportFd = Number(process.env.GENESIS_REPORT_FD);
} catch (error) {
  problem = String(error);
}
if (key === null || key.length !== 32) problem = problem || "no key";

let seq = 0;
function emit(kind, payload) {
  if (problem !== null) {
    // no key: an unsigned line, so that the run is unmeasurable rather than silently empty
    if (reportFd !== null) writeSync(reportFd, `reporter failed: ${problem}\n`);
    return;
  }
  const message = `${seq}\t${kind}\t${stringify(payload)}`;
  const mac = createHmac("sha256", key).update(message).digest("hex");
  seq += 1;
  writeSync(reportFd, `${message}\t${mac}\n`);
}

const short = (text, size) => {
  const value = String(text ?? "");
  return value.length > size ? `${value.slice(0, size - 3)}...` : value;
};

function outcomeOf(type, data) {
  if (type === "test:fail") {
    const failure = data.details?.error?.failureType;
    return failure === "cancelledByParent" || failure === "hookFailed" ? "error" : "failed";
  }
  return data.skip !== undefined || data.todo !== undefined ? "skipped" : "passed";
}

export default async function* genesisReporter(source) {
  if (problem !== null) yield `genesis reporter: ${problem}\n`;
  emit("start", { runner: "node", version: process.version });
  const seen = new Map();
  let tests = 0;
  for await (const event of source) {
    if (event.type !== "test:pass" && event.type !== "test:fail") continue;
    const data = event.data;
    if (data.details?.type === "suite") continue;
    // a file that could not load is a test the entry names after it (as `node --test` does)
    const file = data.file === ENTRY ? String(data.name) : data.file ? path.relative(process.cwd(), data.file) : "";
    const base = `${short(file, 300)}::${short(data.name, 500)}`;
    const n = (seen.get(base) || 0) + 1;
    seen.set(base, n);
    const id = n === 1 ? base : `${base} [${n}]`;
    const error = data.details?.error;
    const message = error ? short(error.cause?.message ?? error.message, 300) : "";
    tests += 1;
    // no prototype: a toJSON a test put on Object.prototype cannot rewrite the line
    emit("result", { __proto__: null, id, outcome: outcomeOf(event.type, data), line: data.line ?? null, message,
          duration_ms: typeof data.details?.duration_ms === "number" ? data.details.duration_ms : null });
  }
  emit("end", { tests, tampered: [] });
}
