"""Elixir: AST analyses with Elixir's own parser (never evaluating the code), ExUnit in the sandbox.

quality: cyclomatic complexity per def/defp/defmacro from Code.string_to_quoted.
linting: Code.format_string! (as `mix format --check-formatted`) plus AST rules EXL001-EXL004, and
    the compiler's warnings when the sandbox is available (compiling runs macros, so only there).
security: AST rules EXS001-EXS007 (see README.md, "Code execution requests").
testing: the code is loaded with ExUnit started and run with seed 0, in the sandbox.
"""

from __future__ import annotations

import re
from pathlib import Path

from genesis_pgflow.analysers import (
    Analyser,
    Analysis,
    Function,
    Issue,
    Toolchain,
    issues_score,
    quality_analysis,
    verdict_analysis,
)
from genesis_pgflow.errors import SandboxUnavailable
from genesis_pgflow.suite import REPORTERS_DIR, ReportChannel, exunit_argv

# run with `elixir analyse.exs MODE`, the code on stdin
ANALYSE = r"""
# Reads Elixir code on stdin and reports on it without evaluating it; argv: quality | security | linting
# Prints one line per finding: FN<TAB>name<TAB>line<TAB>complexity or ISSUE<TAB>rule<TAB>severity<TAB>line<TAB>message
defmodule GenesisAnalysis do
  @def_kinds [:def, :defp, :defmacro, :defmacrop]
  @branches [:if, :unless, :&&, :||, :and, :or]
  @clauses [:case, :cond, :receive, :fn]

  def main([mode]) do
    code = IO.read(:stdio, :eof)
    code = if is_binary(code), do: code, else: ""

    case Code.string_to_quoted(code, columns: true, emit_warnings: false) do
      {:ok, ast} -> run(mode, ast, code)
      {:error, {meta, message, token}} -> issue("syntax-error", "error", line(meta), error_text(message, token))
    end
  end

  defp run("quality", ast, _code), do: Enum.each(functions(ast), &emit_function/1)
  defp run("security", ast, _code), do: walk(ast, &security/1)

  defp run("linting", ast, code) do
    check_format(code)
    walk(ast, &lint/1)
  end

  defp walk(ast, check), do: Macro.prewalk(ast, fn node -> check.(node); node end)

  # --- quality ---------------------------------------------------------------------------
  defp functions(ast) do
    {_, found} =
      Macro.prewalk(ast, [], fn
        {kind, meta, [head | body]} = node, acc when kind in @def_kinds and body != [] ->
          {node, [{name(head), meta[:line], 1 + complexity(body)} | acc]}

        node, acc ->
          {node, acc}
      end)

    Enum.reverse(found)
  end

  defp name({:when, _, [head | _]}), do: name(head)
  defp name({name, _, args}) when is_atom(name), do: "#{name}/#{if is_list(args), do: length(args), else: 0}"
  defp name(other), do: Macro.to_string(other)

  defp complexity(ast) do
    {_, count} =
      Macro.prewalk(ast, 0, fn
        {op, _, args} = node, acc when op in @branches and is_list(args) -> {node, acc + 1}
        {op, _, args} = node, acc when op in @clauses and is_list(args) -> {node, acc + max(clauses(args) - 1, 0)}
        {:with, _, args} = node, acc when is_list(args) -> {node, acc + Enum.count(args, &match?({:<-, _, _}, &1))}
        {:try, _, [blocks]} = node, acc when is_list(blocks) -> {node, acc + clauses_in(blocks, [:rescue, :catch])}
        node, acc -> {node, acc}
      end)

    count
  end

  defp clauses(args) do
    Enum.reduce(args, 0, fn
      {:->, _, _}, acc -> acc + 1
      [{:do, body} | _], acc when is_list(body) -> acc + Enum.count(body, &match?({:->, _, _}, &1))
      _, acc -> acc
    end)
  end

  defp clauses_in(blocks, keys) do
    blocks |> Enum.filter(fn {key, _} -> key in keys; _ -> false end)
    |> Enum.map(fn {_, body} when is_list(body) -> length(body); _ -> 1 end) |> Enum.sum()
  end

  defp emit_function({name, line, complexity}), do: IO.puts("FN\t#{clean(name)}\t#{line}\t#{complexity}")

  # --- security: documented in README.md, "Code execution requests" ------------------------------------------------
  @eval_functions [:eval_string, :eval_quoted, :eval_file, :compile_string, :compile_quoted, :require_file]
  defp security({{:., _, [{:__aliases__, _, [:Code]}, fun]}, meta, _}) when fun in @eval_functions,
    do: issue("EXS001", "error", line(meta), "Code.#{fun} evaluates code built at run time")

  defp security({{:., _, [{:__aliases__, _, [:System]}, fun]}, meta, [command | _]}) when fun in [:cmd, :shell] do
    unless literal?(command),
      do: issue("EXS002", "error", line(meta), "System.#{fun} with a command that is not a literal")
  end

  defp security({{:., _, [:os, :cmd]}, meta, [command | _]}) do
    unless literal?(command), do: issue("EXS002", "error", line(meta), ":os.cmd with a command that is not a literal")
  end

  defp security({{:., _, [{:__aliases__, _, [mod]}, fun]}, meta, [arg | _]})
       when mod in [:String, :List] and fun in [:to_atom] do
    unless literal?(arg),
      do: issue("EXS003", "warning", line(meta), "#{mod}.to_atom on input can exhaust the atom table; use to_existing_atom")
  end

  defp security({{:., _, [:erlang, :binary_to_term]}, meta, args}) do
    unless safe_options?(args),
      do: issue("EXS004", "error", line(meta), ":erlang.binary_to_term without [:safe] can create atoms and functions")
  end

  defp security({{:., _, [:crypto, :hash]}, meta, [algorithm | _]}) when algorithm in [:md5, :sha, :md4],
    do: issue("EXS005", "warning", line(meta), ":crypto.hash(#{inspect(algorithm)}) is a weak hash")

  defp security({{:., _, [{:__aliases__, _, [:File]}, fun]}, meta, [path | _]}) when fun in [:rm_rf, :rm_rf!] do
    unless literal?(path), do: issue("EXS006", "warning", line(meta), "File.#{fun} on a path that is not a literal")
  end

  defp security({:apply, meta, [module, fun | _]}) do
    unless literal?(module) and literal?(fun),
      do: issue("EXS007", "info", line(meta), "apply/3 with a module or function chosen at run time")
  end

  defp security(_), do: :ok

  defp safe_options?([_, options]) when is_list(options), do: :safe in options
  defp safe_options?(_), do: false

  defp literal?(value) when is_binary(value) or is_atom(value) or is_number(value), do: true
  defp literal?({:__aliases__, _, _}), do: true
  defp literal?({sigil, _, [{:<<>>, _, parts}, _]}) when sigil in [:sigil_c, :sigil_s, :sigil_C, :sigil_S],
    do: Enum.all?(parts, &is_binary/1)
  defp literal?(list) when is_list(list), do: Enum.all?(list, &literal?/1)
  defp literal?(_), do: false

  # --- linting ---------------------------------------------------------------------------
  defp check_format(code) do
    formatted = code |> Code.format_string!() |> IO.iodata_to_binary()

    if String.trim_trailing(formatted) != String.trim_trailing(code) do
      first_difference =
        Enum.zip(String.split(code, "\n"), String.split(formatted, "\n"))
        |> Enum.find_index(fn {a, b} -> a != b end)

      issue("format", "warning", (first_difference || 0) + 1, "not formatted as `mix format` would format it")
    end
  rescue
    error -> issue("format", "warning", nil, "the formatter failed: #{Exception.message(error)}")
  end

  defp lint({{:., _, [{:__aliases__, _, [:IO]}, :inspect]}, meta, _}),
    do: issue("EXL001", "warning", line(meta), "IO.inspect left in the code")

  defp lint({{:., _, [{:__aliases__, _, [:IEx]}, :pry]}, meta, _}),
    do: issue("EXL001", "warning", line(meta), "IEx.pry left in the code")

  defp lint({:dbg, meta, args}) when is_list(args), do: issue("EXL001", "warning", line(meta), "dbg left in the code")

  defp lint({kind, meta, [head | _]}) when kind in @def_kinds do
    case head_name(head) do
      name when is_atom(name) ->
        text = Atom.to_string(name)

        if text != Macro.underscore(text) and not String.starts_with?(text, ["__", "sigil_"]),
          do: issue("EXL002", "info", line(meta), "function #{text} is not snake_case")

      _ ->
        :ok
    end
  end

  defp lint({:defmodule, meta, [{:__aliases__, _, parts} | _]}) do
    Enum.each(parts, fn part ->
      if is_atom(part) and String.contains?(Atom.to_string(part), "_"),
        do: issue("EXL003", "info", line(meta), "module name #{part} is not PascalCase")
    end)
  end

  defp lint({:__block__, _, [_ | _] = body}) do
    Enum.each(body, fn
      {:import, meta, [{:__aliases__, _, _} = mod]} ->
        issue("EXL004", "info", line(meta), "import #{Macro.to_string(mod)} without only: brings in every function")

      _ ->
        :ok
    end)
  end

  defp lint(_), do: :ok

  defp head_name({:when, _, [head | _]}), do: head_name(head)
  defp head_name({name, _, _}) when is_atom(name), do: name
  defp head_name(_), do: nil

  # --- output ----------------------------------------------------------------------------
  defp line(meta) when is_list(meta), do: meta[:line]
  defp line(_), do: nil

  defp error_text(message, token) when is_binary(message), do: message <> to_string_safe(token)
  defp error_text({prefix, suffix}, token), do: "#{prefix}#{to_string_safe(token)}#{suffix}"
  defp error_text(message, token), do: "#{inspect(message)} #{to_string_safe(token)}"
  defp to_string_safe(token) when is_binary(token), do: token
  defp to_string_safe(token), do: inspect(token)

  defp issue(rule, severity, line, message),
    do: IO.puts("ISSUE\t#{rule}\t#{severity}\t#{line}\t#{clean(message)}")

  defp clean(text), do: text |> to_string() |> String.replace(~r/[\t\r\n]+/, " ")
end

GenesisAnalysis.main(System.argv())
"""

# the code is loaded as code.exs, then ExUnit runs whatever test modules it defined; our formatter
# (required first, suite.py) counts them
RUN_TESTS = r"""
ExUnit.start(autorun: false, seed: 0, colors: [enabled: false],
             formatters: [ExUnit.CLIFormatter, GenesisPgflow.ExUnitFormatter])
Code.require_file("code.exs")
ExUnit.run()
"""
_WARNING = re.compile(r"^warning: (.+?)\n\s+code\.ex:(\d+)", re.MULTILINE | re.DOTALL)
_COMPILE_ERROR = re.compile(r"^\*\* \((\w+Error)\) code\.ex:(\d+):(?:\d+:)? (.+)$", re.MULTILINE)


def _static(code: str, mode: str, tools: Toolchain) -> tuple[list[Function], list[Issue]]:
    result = tools.run([tools.elixir, "analyse.exs", mode], stdin=code, files={"analyse.exs": ANALYSE},
                       env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/nonexistent"})
    if result.returncode != 0:
        raise RuntimeError(f"the Elixir analysis failed: {result.stderr.strip()[-500:]}")
    functions, issues = [], []
    for row in result.stdout.splitlines():
        kind, *fields = row.split("\t")
        if kind == "FN" and len(fields) == 3:
            functions.append(Function(fields[0], int(fields[1] or 0), int(fields[2])))
        elif kind == "ISSUE" and len(fields) == 4:
            rule, severity, line, message = fields
            issues.append(Issue(rule, severity, int(line) if line.isdigit() else None, message))
    return functions, issues


def quality(code: str, tools: Toolchain) -> Analysis:
    functions, issues = _static(code, "quality", tools)
    return quality_analysis(functions, issues)


def security(code: str, tools: Toolchain) -> Analysis:
    _functions, issues = _static(code, "security", tools)
    return Analysis(issues, issues_score(issues))


def linting(code: str, tools: Toolchain) -> Analysis:
    _functions, issues = _static(code, "linting", tools)
    if tools.sandbox.available and not any(i.rule == "syntax-error" for i in issues):
        issues += _compiler_warnings(code, tools)
    return Analysis(issues, issues_score(issues))


def _compiler_warnings(code: str, tools: Toolchain) -> list[Issue]:
    """Compiling runs macros and module bodies: untrusted, so only in the sandbox."""
    try:
        result = tools.sandboxed([tools.elixir, "-e", 'Code.compile_file("code.ex")'], files={"code.ex": code})
    except SandboxUnavailable:
        return []
    output = result.stderr + result.stdout
    issues = [Issue("compiler-warning", "warning", int(line), " ".join(message.split()))
              for message, line in _WARNING.findall(output)]
    issues += [Issue("compile-error", "error", int(line), f"{kind}: {message.strip()}")
               for kind, line, message in _COMPILE_ERROR.findall(output)]
    return issues


def testing(code: str, tools: Toolchain) -> Analysis:
    """ExUnit on the code, in the sandbox; counts from our formatter's channel (suite.py), never
    from the output."""
    with ReportChannel() as channel:
        result = tools.sandboxed(exunit_argv(tools.elixir, "run.exs"), files={"run.exs": RUN_TESTS, "code.exs": code},
                                 env=channel.env, ro_paths=[REPORTERS_DIR], pass_fds=channel.pass_fds)
    verdict = channel.verdict("exunit-formatter")
    output = result.stdout + result.stderr
    issues = [Issue("test-failed" if outcome == "failed" else "test-error", "error", verdict.lines.get(test_id),
                    f"{test_id.split('::', 1)[-1]} ({test_id.split('::', 1)[0]})")
              for test_id, outcome in verdict.outcomes.items() if outcome in ("failed", "error")]
    if not verdict.outcomes and not result.timed_out and "** (" in output:
        issues.append(Issue("test-error", "error", None, "the code did not load: " + _first_error(output)))
    return verdict_analysis(verdict, issues, result)


def _first_error(output: str) -> str:
    lines = output.strip().splitlines() or ["no output"]
    return next((line for line in lines if line.startswith("** (")), lines[-1])


def analysers(tools: Toolchain) -> dict[tuple[str, str], Analyser]:
    if not Path(tools.elixir).is_file():
        return {}
    return {("elixir", "quality"): quality, ("elixir", "linting"): linting,
            ("elixir", "security"): security, ("elixir", "testing"): testing}
