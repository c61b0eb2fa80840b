// The node side of genesis_pgflow's test runs: imports each node:test file in this one process, in order.
//
// `node --test` would run each file in a child process and take the test events it parses from
// that child's stdout, which the code under test can write to (forged `test:pass` frames were
// counted). Started as `node --import=<reporter> --test-reporter=<reporter> ... this-file [paths]`
// (suite.node_argv), the tests run here, beside our reporter, and nothing parses any output.
// Files are found as Node 20's `node --test` finds them: the paths given (directories searched),
// else the working directory; under a `test` directory any .js/.mjs/.cjs file, elsewhere names
// like test.js, test-x.js, x.test.js, x-test.js, x_test.js; never inside node_modules.
import fs from "node:fs";
import path from "node:path";
import { test } from "node:test";
import { pathToFileURL } from "node:url";

const SUPPORTED = new Set([".js", ".mjs", ".cjs"]);
const TEST_NAME = /^test$|^test-.+|.+[.\-_]test$/;

function collect(target, underTestDir, userSupplied, found) {
  const stat = fs.statSync(target);
  if (stat.isFile()) {
    const extension = path.extname(target);
    if (userSupplied || (SUPPORTED.has(extension) && (underTestDir || TEST_NAME.test(path.basename(target, extension))))) {
      found.add(target);
    }
    return;
  }
  if (!stat.isDirectory()) return;
  const name = path.basename(target);
  if (name === "node_modules" && !userSupplied) return;
  for (const entry of fs.readdirSync(target).sort()) {
    collect(path.join(target, entry), underTestDir || name === "test", false, found);
  }
}

const given = process.argv.slice(2);
const found = new Set();
for (const target of given.length > 0 ? given : [process.cwd()]) {
  const absolute = path.resolve(target);
  if (!fs.existsSync(absolute)) {
    process.stderr.write(`Could not find '${absolute}'\n`);
    process.exit(1);
  }
  collect(absolute, false, given.length > 0, found);
}
if (found.size === 0) process.stderr.write("genesis: no test files found\n");

for (const file of found) {
  try {
    await import(pathToFileURL(file).href);
  } catch (error) {
    // as `node --test` does: a file that cannot load is one failed test, named after the file
    test(path.relative(process.cwd(), file), () => { throw error; });
  }
}
