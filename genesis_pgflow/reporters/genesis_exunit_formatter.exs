# The Elixir side of genesis_pgflow's report channel: an ExUnit formatter that signs one line per
# test on the descriptor GENESIS_REPORT_FD, with the key read once from GENESIS_KEY_FD.
#
# Required first (`elixir -r genesis_exunit_formatter.exs ...`), before any code under test is
# loaded: the key pipe is drained then, so test code finds it empty. The formatter is then added
# with ExUnit.configure(formatters: [..., GenesisPgflow.ExUnitFormatter]) or
# `mix test --formatter GenesisPgflow.ExUnitFormatter`. Lines are those of
# reporters/genesis_pytest_plugin.py (kinds start, result, end), checked by suite.py; a run that
# halts (System.halt) before ExUnit finishes has no end line and is not counted as passed.
#
# Residual risk (documented in the README): the tests run in the same VM, which can reach this
# formatter's state (:sys.get_state, :persistent_term) and send it events.
defmodule GenesisPgflow.ExUnitFormatter do
  @moduledoc false
  use GenServer

  @key {__MODULE__, :key}

  def read_key do
    with {key_fd, ""} <- Integer.parse(System.get_env("GENESIS_KEY_FD", "")) do
      port = Port.open({:fd, key_fd, key_fd}, [:binary, :in, :eof])
      text = drain(port, "")
      Port.close(port)

      case Base.decode16(String.trim(text), case: :lower) do
        {:ok, key} when byte_size(key) == 32 -> :persistent_term.put(@key, key)
        _ -> :ok
      end
    end
  end

  defp drain(port, acc) do
    receive do
      {^port, {:data, data}} -> drain(port, acc <> data)
      {^port, :eof} -> acc
    after
      10_000 -> acc
    end
  end

  @impl true
  def init(_opts) do
    key = :persistent_term.get(@key, nil)
    :persistent_term.erase(@key)

    port =
      case Integer.parse(System.get_env("GENESIS_REPORT_FD", "")) do
        {fd, ""} -> Port.open({:fd, 0, fd}, [:binary, :out])
        _ -> nil
      end

    state = %{key: key, port: port, seq: 0, tests: 0, seen: %{}}
    {:ok, emit(state, "start", [runner: "exunit", version: System.version()])}
  end

  @impl true
  def handle_cast({:test_finished, %ExUnit.Test{} = test}, state) do
    base = short("#{inspect(test.module)}::#{test.name}", 600)
    n = Map.get(state.seen, base, 0) + 1
    id = if n == 1, do: base, else: "#{base} [#{n}]"
    {outcome, message} = outcome(test.state)
    line = if is_integer(test.tags[:line]), do: test.tags[:line], else: nil
    state = %{state | seen: Map.put(state.seen, base, n), tests: state.tests + 1}
    {:noreply, emit(state, "result", id: id, outcome: outcome, line: line, message: short(message, 300),
                             duration_ms: div(test.time || 0, 1000))}
  end

  def handle_cast({:suite_finished, _times}, state) do
    {:noreply, emit(state, "end", tests: state.tests, tampered: [])}
  end

  def handle_cast(_event, state), do: {:noreply, state}

  defp outcome(nil), do: {"passed", ""}
  defp outcome({:failed, failures}), do: {"failed", failure_message(failures)}
  defp outcome({:skipped, _}), do: {"skipped", ""}
  defp outcome({:excluded, _}), do: {"skipped", ""}
  defp outcome({:invalid, _}), do: {"error", "setup_all failed"}
  defp outcome(other), do: {"error", inspect(other)}

  defp failure_message([{kind, reason, _stack} | _]) do
    Exception.format_banner(kind, reason) |> String.split("\n") |> Enum.take(3) |> Enum.join(" ")
  rescue
    _ -> "failed"
  end

  defp failure_message(_), do: "failed"

  defp emit(%{key: nil, port: port} = state, _kind, _payload) do
    # no key: an unsigned line, so that the run is unmeasurable rather than silently empty
    if port, do: Port.command(port, "reporter failed: no key\n")
    state
  end

  defp emit(%{port: nil} = state, _kind, _payload), do: state

  defp emit(state, kind, payload) do
    message = "#{state.seq}\t#{kind}\t#{json(payload)}"
    mac = :crypto.mac(:hmac, :sha256, state.key, message) |> Base.encode16(case: :lower)
    Port.command(state.port, [message, "\t", mac, "\n"])
    %{state | seq: state.seq + 1}
  end

  defp short(text, size) do
    text = if String.valid?(text), do: text, else: inspect(text)
    if String.length(text) > size, do: String.slice(text, 0, size - 3) <> "...", else: text
  end

  defp json(pairs) when is_list(pairs),
    do: "{" <> Enum.map_join(pairs, ",", fn {k, v} -> json(to_string(k)) <> ":" <> json(v) end) <> "}"

  defp json(nil), do: "null"
  defp json(value) when is_integer(value), do: Integer.to_string(value)
  defp json(values) when is_list(values), do: "[" <> Enum.map_join(values, ",", &json/1) <> "]"

  defp json(text) when is_binary(text) do
    escaped =
      for <<char::utf8 <- text>>, into: "" do
        case char do
          ?" -> "\\\""
          ?\\ -> "\\\\"
          c when c < 0x20 or c > 0x7E -> escape(c)
          c -> <<c>>
        end
      end

    "\"" <> escaped <> "\""
  end

  defp escape(c) when c > 0xFFFF do
    c = c - 0x10000
    escape(0xD800 + Bitwise.bsr(c, 10)) <> escape(0xDC00 + Bitwise.band(c, 0x3FF))
  end

  defp escape(c), do: "\\u" <> String.pad_leading(Integer.to_string(c, 16), 4, "0")
end

GenesisPgflow.ExUnitFormatter.read_key()
