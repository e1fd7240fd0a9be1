#!/usr/bin/env bash
# Install what the tests and the demo need on a fresh Debian machine: redis-server from Debian, a
# Python virtualenv with the pinned packages and the four local packages (editable), and the pinned
# Kubernetes tools (hack/tools.sh, cached outside the repository). Idempotent and quick when warm.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
log() { printf '[setup %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# Debian packages: redis-server for the tests and the demo, openssl for the local control plane's
# certificates; containerd, runc, the CNI plugins, iproute2 and iptables for the real node; chromium
# (run headless) for the gateway's browser test.
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v containerd >/dev/null 2>&1 || missing+=(containerd)
command -v runc >/dev/null 2>&1 || missing+=(runc)
[ -x /usr/lib/cni/bridge ] || missing+=(containernetworking-plugins)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v iptables >/dev/null 2>&1 || missing+=(iptables)
command -v nsenter >/dev/null 2>&1 || missing+=(util-linux)
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The packages start system-wide instances; tests start their own (free ports, own state dirs).
  for service in redis-server containerd prometheus; do
    ($SUDO systemctl disable --now "$service" >/dev/null 2>&1 || $SUDO service "$service" stop >/dev/null 2>&1) || true
  done
fi

PY="${PYTHON:-python3}"
stamp=".venv/.installed"
if [ ! -x .venv/bin/python ]; then
  log "creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
hash_now="$(cat requirements-dev.txt worker/pyproject.toml operator/pyproject.toml harness/pyproject.toml gateway/pyproject.toml | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$hash_now" ]; then
  log "installing Python packages into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements-dev.txt -e "worker[uvloop,otel]" -e operator -e harness -e gateway
  echo "$hash_now" > "$stamp"
else
  log "Python packages up to date"
fi

if [ "${SKIP_TOOLS:-0}" != 1 ]; then
  bash hack/tools.sh
fi
bash hack/llama.sh  # the model handler's real test server, cached outside the repository (SKIP_LLAMA=1 skips)
log "ready"
