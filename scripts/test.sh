#!/usr/bin/env bash
# The test command (README): installs what the tests need, then checks formatting and lints,
# builds, runs every test, and runs the demo as an end-to-end smoke test.
#
# Environment:
#   RUNOS_SKIP_INSTALL=1   do not install system packages
#   RUNOS_SKIP_DEMO=1      do not run the demo at the end
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

# System packages the tests use. Installed only when missing, and only as root (CI is root).
packages=(ca-certificates gcc libc6-dev pkg-config procps iproute2 faketime shellcheck curl
  wireguard-go wireguard-tools iputils-ping util-linux
  etcd-server etcd-client protobuf-compiler libprotobuf-dev)
if [ "${RUNOS_SKIP_INSTALL:-0}" != 1 ]; then
  missing=()
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      step "installing ${missing[*]}"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    else
      echo "warning: missing packages ${missing[*]} (run as root to install them)" >&2
    fi
  fi
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "shellcheck"
if command -v shellcheck >/dev/null; then
  shellcheck -s sh installer/install.sh
else
  echo "warning: shellcheck is not installed; skipping (run as root to install it)" >&2
fi

step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "module cycles"
python3 scripts/module-cycles.py agent/src

step "cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet

step "cargo build"
cargo build --workspace --bins --locked

step "cargo test"
if [ "$(id -u)" != 0 ]; then
  echo "note: not root; tests that need root or network namespaces will skip with a reason"
fi
target_dir="${CARGO_TARGET_DIR:-target}"
mkdir -p "$target_dir"
cargo test --workspace --locked -- --nocapture 2>&1 | tee "$target_dir/test-output.log"
# cargo test exits non-zero on failure (pipefail), so reaching here means every test passed.

if [ "${RUNOS_SKIP_DEMO:-0}" != 1 ]; then
  step "demo (end-to-end smoke test)"
  timeout 300 "$target_dir/debug/runos-controlplane" demo --agent-bin "$target_dir/debug/runos"
fi

step "all checks passed"
