#!/usr/bin/env bash
# Installs the system tools that JobExecutor and the sandbox use, only where they are missing:
#   bubblewrap (bwrap)  the sandbox; prlimit and setpriv come with util-linux
#   libseccomp2         builds the sandbox's seccomp filter (loaded with ctypes: no Python
#                       binding needed); without it testing fails with sandbox_unavailable
#   elixir              Elixir analysis (pulls in Erlang/OTP) and ExUnit tests
#   python3-pytest      pytest for the sandbox's /usr/bin/python3
#   nodejs              JavaScript/TypeScript tests (`node --test`) and the npm tools below
#   chromium            the dashboard's browser test (Playwright drives Debian's build; no download)
#   npm tools           Biome (linting) and TypeScript (parser for the JS/TS security rules),
#                       installed with npm into $GENESIS_TOOLS_DIR (default <repo>/.tools/)
# Idempotent: exits 0 at once when everything is present. Run as root (or with sudo).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="${GENESIS_TOOLS_DIR:-$repo/.tools}"
biome_version="2.3.8"
typescript_version="5.9.3"

declare -A apt_for=(
  [bwrap]=bubblewrap
  [elixir]=elixir
  [prlimit]=util-linux
  [setpriv]=util-linux
  [node]=nodejs
  [chromium]=chromium
)
missing=()
for command in "${!apt_for[@]}"; do
  command -v "$command" >/dev/null 2>&1 || missing+=("${apt_for[$command]}")
done
/usr/bin/python3 -c 'import pytest' >/dev/null 2>&1 || missing+=(python3-pytest)
/sbin/ldconfig -p 2>/dev/null | grep -q 'libseccomp\.so\.2 ' || missing+=(libseccomp2)
if ! command -v npm >/dev/null 2>&1 && command -v node >/dev/null 2>&1; then missing+=(npm); fi

if ((${#missing[@]})); then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  sudo=""
  if [[ $(id -u) -ne 0 ]]; then sudo="sudo"; fi
  echo "system-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

have_npm_tool() {
  [[ -x "$tools/node_modules/.bin/biome" ]] &&
    [[ -f "$tools/node_modules/typescript/package.json" ]] &&
    grep -q "\"version\": \"$typescript_version\"" "$tools/node_modules/typescript/package.json" &&
    grep -q "\"version\": \"$biome_version\"" "$tools/node_modules/@biomejs/biome/package.json"
}
if ! have_npm_tool; then
  echo "system-deps: installing @biomejs/biome@$biome_version typescript@$typescript_version into $tools"
  mkdir -p "$tools"
  [[ -f "$tools/package.json" ]] || echo '{"private": true}' >"$tools/package.json"
  npm install --prefix "$tools" --no-audit --no-fund --loglevel=error --save-exact \
    "@biomejs/biome@$biome_version" "typescript@$typescript_version" >/dev/null
  have_npm_tool || { echo "system-deps: npm tools missing after install" >&2; exit 1; }
fi
exit 0
