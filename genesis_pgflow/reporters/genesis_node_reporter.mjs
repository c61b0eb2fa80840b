// The node side of genesis_pgflow's report channel: a `node --test` reporter that signs one line
// per test on the descriptor GENESIS_REPORT_FD, with the key read once from GENESIS_KEY_FD.
//
// It runs in the test runner's parent process, where no test code runs: `node --test` runs each
// test file in a child process. The module is imported before the runner starts any child, so the
// key pipe is drained and closed first, and no child inherits it. The pipes belong to root, so
// that no process of the sandbox's uid can open them again through /proc/<pid>/fd; a child may
// inherit the report descriptor, but cannot sign a line. Lines are those of
// reporters/genesis_pytest_plugin.py (kinds start, result, end), checked by suite.py.
//
// Residual risk (documented in the README): a child (the code under test) can write the runner's
// own serialized event frames on its stdout, which this parent then takes for real events, and as
// the same uid it can read this process's memory through /proc.
import crypto from "node:crypto";
import fs from "node:fs";
import path from "node:path";

const createHmac = crypto.createHmac;
const writeSync = fs.writeSync;
const stringify = JSON.stringify;

let key = null;
let reportFd = null;
let problem = null;
try {
  const keyFd = Number(process.env.GENESIS_KEY_FD);
  key = Buffer.from(fs.readFileSync(keyFd, "utf8").trim(), "hex");
  fs.closeSync(keyFd);
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
    const file = data.file ? path.relative(process.cwd(), data.file) : "";
    const base = `${short(file, 300)}::${short(data.name, 500)}`;
    const n = (seen.get(base) || 0) + 1;
    seen.set(base, n);
    const id = n === 1 ? base : `${base} [${n}]`;
    const error = data.details?.error;
    const message = error ? short(error.cause?.message ?? error.message, 300) : "";
    tests += 1;
    emit("result", { id, outcome: outcomeOf(event.type, data), line: data.line ?? null, message });
  }
  emit("end", { tests, tampered: [] });
}
