"""JavaScript and TypeScript: lizard (quality), Biome (linting), AST rules on TypeScript's parser
(security), node's test runner in the sandbox (testing).

Biome and TypeScript come from npm, installed by scripts/system-deps.sh into <repo>/.tools/.
The security rules JSS001-JSS008 (README.md, "Code execution requests") walk the syntax tree, so words in comments and
strings are never mistaken for calls; the code is parsed, never run.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

from genesis_pgflow.analysers import (
    Analyser,
    Analysis,
    Issue,
    Toolchain,
    issues_score,
    line_of,
    verdict_analysis,
)
from genesis_pgflow.analysers.generic import lizard_quality
from genesis_pgflow.suite import REPORTERS_DIR, ReportChannel, node_argv

# node helper.js TYPESCRIPT_DIR MODE (security | prepare) FILENAME, the code on stdin; prints JSON
HELPER = r"""
const ts = require(process.argv[2]);
const mode = process.argv[3], fileName = process.argv[4];
const code = require("fs").readFileSync(0, "utf8");
const kind = /\.tsx?$/.test(fileName) ? (fileName.endsWith("x") ? ts.ScriptKind.TSX : ts.ScriptKind.TS) : ts.ScriptKind.JS;
const source = ts.createSourceFile(fileName, code, ts.ScriptTarget.Latest, true, kind);
const esm = source.externalModuleIndicator !== undefined;
if (mode === "prepare") {
  const module = esm ? ts.ModuleKind.ESNext : ts.ModuleKind.CommonJS;
  const out = kind === ts.ScriptKind.JS ? code : ts.transpileModule(code, {
    fileName, compilerOptions: {module, target: ts.ScriptTarget.ES2022, sourceMap: false}}).outputText;
  process.stdout.write(JSON.stringify({esm, code: out}));
  process.exit(0);
}
const issues = [];
const line = (node) => source.getLineAndCharacterOfPosition(node.getStart(source)).line + 1;
const report = (rule, severity, node, message) => issues.push({rule, severity, line: line(node), message});
for (const d of source.parseDiagnostics || []) {
  issues.push({rule: "syntax-error", severity: "error",
               line: source.getLineAndCharacterOfPosition(d.start || 0).line + 1,
               message: ts.flattenDiagnosticMessageText(d.messageText, " ")});
}
const literal = (node) => node && (ts.isStringLiteral(node) || ts.isNoSubstitutionTemplateLiteral(node));
const stringy = (node) => node && (literal(node) || ts.isTemplateExpression(node) ||
  (ts.isBinaryExpression(node) && node.operatorToken.kind === ts.SyntaxKind.PlusToken && (stringy(node.left) || stringy(node.right))));
const childProcess = new Set(), childFunctions = new Set();
const isChildProcess = (node) => node && ((ts.isCallExpression(node) && ts.isIdentifier(node.expression) &&
  node.expression.text === "require" && literal(node.arguments[0]) && /^(node:)?child_process$/.test(node.arguments[0].text)));
const calleeName = (expr) => ts.isIdentifier(expr) ? expr.text : (ts.isPropertyAccessExpression(expr) ? expr.name.text : null);
const objectName = (expr) => ts.isPropertyAccessExpression(expr) && ts.isIdentifier(expr.expression) ? expr.expression.text : null;
const SHELL = new Set(["exec", "execSync"]), SPAWN = new Set(["spawn", "spawnSync", "execFile", "execFileSync"]);
const VM = new Set(["runInThisContext", "runInNewContext", "runInContext", "compileFunction"]);

function bindings(node) {
  if (ts.isImportDeclaration(node) && literal(node.moduleSpecifier) && /^(node:)?child_process$/.test(node.moduleSpecifier.text)) {
    const clause = node.importClause;
    if (clause && clause.name) childProcess.add(clause.name.text);
    if (clause && clause.namedBindings) {
      if (ts.isNamespaceImport(clause.namedBindings)) childProcess.add(clause.namedBindings.name.text);
      else for (const el of clause.namedBindings.elements) childFunctions.add(el.name.text);
    }
  }
  if (ts.isVariableDeclaration(node) && isChildProcess(node.initializer)) {
    if (ts.isIdentifier(node.name)) childProcess.add(node.name.text);
    else if (ts.isObjectBindingPattern(node.name)) for (const el of node.name.elements) childFunctions.add(el.name.text);
  }
  ts.forEachChild(node, bindings);
}

function visit(node) {
  if (ts.isCallExpression(node) || ts.isNewExpression(node)) {
    const callee = node.expression, name = calleeName(callee), args = node.arguments || [];
    const fromChild = (ts.isIdentifier(callee) && childFunctions.has(name)) ||
      (objectName(callee) !== null && childProcess.has(objectName(callee))) || (ts.isPropertyAccessExpression(callee) && isChildProcess(callee.expression));
    if (ts.isIdentifier(callee) && name === "eval") report("JSS001", "error", node, "eval() runs a string as code");
    else if (ts.isIdentifier(callee) && name === "Function") report("JSS002", "error", node, "the Function constructor runs a string as code");
    else if (ts.isIdentifier(callee) && (name === "setTimeout" || name === "setInterval") && stringy(args[0]))
      report("JSS003", "error", node, `${name} with a string runs it as code`);
    else if (fromChild && SHELL.has(name) && !literal(args[0]))
      report("JSS004", "error", node, `child_process.${name} runs a shell command built at run time`);
    else if (fromChild && SPAWN.has(name) && !literal(args[0]))
      report("JSS004", "warning", node, `child_process.${name} runs a program chosen at run time`);
    else if (ts.isPropertyAccessExpression(callee) && VM.has(name)) report("JSS005", "error", node, `vm.${name} runs a string as code`);
    else if (ts.isPropertyAccessExpression(callee) && (name === "write" || name === "writeln") && objectName(callee) === "document")
      report("JSS006", "warning", node, `document.${name} can inject HTML`);
    else if (ts.isPropertyAccessExpression(callee) && name === "insertAdjacentHTML" && !literal(args[1]))
      report("JSS006", "warning", node, "insertAdjacentHTML with HTML built at run time");
    else if (((ts.isIdentifier(callee) && name === "require") || callee.kind === ts.SyntaxKind.ImportKeyword) && args.length && !literal(args[0]))
      report("JSS007", "warning", node, "a module chosen at run time is loaded");
    else if (ts.isPropertyAccessExpression(callee) && name === "createHash" && literal(args[0]) && /^(md4|md5|sha1)$/i.test(args[0].text))
      report("JSS008", "warning", node, `createHash('${args[0].text}') is a weak hash`);
  }
  if (ts.isBinaryExpression(node) && node.operatorToken.kind === ts.SyntaxKind.EqualsToken &&
      ts.isPropertyAccessExpression(node.left) && /^(innerHTML|outerHTML)$/.test(node.left.name.text) && !literal(node.right))
    report("JSS006", "warning", node, `${node.left.name.text} assigned HTML built at run time`);
  ts.forEachChild(node, visit);
}
bindings(source);
visit(source);
process.stdout.write(JSON.stringify(issues));
"""
_EXTENSIONS = {"javascript": "js", "typescript": "ts"}
_BIOME_SEVERITY = {"fatal": "error", "error": "error", "warning": "warning", "information": "info", "hint": "info"}


def _biome(tools: Toolchain) -> Path:
    return tools.node_modules / ".bin" / "biome"


def _typescript(tools: Toolchain) -> Path:
    return tools.node_modules / "typescript"


def _helper(code: str, mode: str, file_name: str, tools: Toolchain) -> object:
    result = tools.run([tools.node, "helper.js", str(_typescript(tools)), mode, file_name], stdin=code,
                       files={"helper.js": HELPER}, env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"})
    if result.returncode != 0:
        raise RuntimeError(f"the TypeScript parser failed: {result.stderr.strip()[-500:]}")
    return json.loads(result.stdout)


def linting(code: str, tools: Toolchain, *, extension: str) -> Analysis:
    result = tools.run([str(_biome(tools)), "lint", "--reporter=json", "--max-diagnostics=1000",
                        "--colors=off", f"code.{extension}"],
                       files={f"code.{extension}": code, "biome.json": '{"vcs": {"enabled": false}}'},
                       env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "BIOME_LOG_LEVEL": "none"})
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"biome failed: {(result.stderr or result.stdout).strip()[-500:]}") from None
    issues = []
    for d in report.get("diagnostics", []):
        span = (d.get("location") or {}).get("span") or [0]
        rule = d.get("category", "biome").removeprefix("lint/")
        issues.append(Issue("syntax-error" if rule == "parse" else rule, _BIOME_SEVERITY.get(d.get("severity"), "warning"),
                            line_of(code, span[0]), d.get("description", "")))
    return Analysis(issues, issues_score(issues))


def security(code: str, tools: Toolchain, *, extension: str) -> Analysis:
    issues = [Issue(**found) for found in _helper(code, "security", f"code.{extension}", tools)]  # type: ignore[attr-defined]
    return Analysis(issues, issues_score(issues))


def testing(code: str, tools: Toolchain, *, extension: str) -> Analysis:
    """node --test on the code (TypeScript transpiled first, by the parser, without running it);
    counts from our reporter's channel (suite.py), never from the output."""
    prepared = _helper(code, "prepare", f"code.{extension}", tools)
    name = "code.test.mjs" if prepared["esm"] else "code.test.cjs"  # type: ignore[index]
    with ReportChannel() as channel:
        result = tools.sandboxed(node_argv(tools.node, [name]), files={name: prepared["code"]},  # type: ignore[index]
                                 env=channel.env, ro_paths=[REPORTERS_DIR], pass_fds=channel.pass_fds)
    verdict = channel.verdict("node-reporter")
    issues = [Issue("test-failed", "error", verdict.lines.get(test_id), test_id.split("::", 1)[-1])
              for test_id, outcome in verdict.outcomes.items() if outcome in ("failed", "error")]
    return verdict_analysis(verdict, issues, result)


def analysers(tools: Toolchain) -> dict[tuple[str, str], Analyser]:
    found: dict[tuple[str, str], Analyser] = {}
    for language, extension in _EXTENSIONS.items():
        found[(language, "quality")] = partial(lizard_quality, extension=extension)
        if Path(tools.node).is_file() and _typescript(tools).is_dir():
            found[(language, "security")] = partial(security, extension=extension)
            found[(language, "testing")] = partial(testing, extension=extension)
        if _biome(tools).is_file():
            found[(language, "linting")] = partial(linting, extension=extension)
    return found
