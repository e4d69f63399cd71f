#!/usr/bin/env bash
# Set up everything Exchange needs on a fresh Debian machine, idempotently.
# The second run only checks stamps, so `make demo` and `make test` stay quick.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the project needs: PostgreSQL for the scale-out database tests, and
# Chromium for the viewer's browser tests (Playwright drives Debian's Chromium at
# /usr/bin/chromium; Playwright's own browsers are never downloaded).
DEBIAN_PACKAGES=(postgresql chromium)

PYTHON="${PYTHON:-python3}"
# Debian splits venv/ensurepip out of the interpreter package.
if command -v "$PYTHON" >/dev/null && ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
  DEBIAN_PACKAGES+=(python3-venv)
fi

missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "bootstrap: installing Debian packages: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "bootstrap: Python 3.11 or newer is required (found: $("$PYTHON" --version 2>&1))" >&2
  exit 1
fi

if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv"
  "$PYTHON" -m venv .venv
fi

stamp=.venv/.exchange-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "bootstrap: installing Python packages (pinned by constraints.txt)"
  log=$(mktemp)
  if ! { .venv/bin/python -m pip install -q --upgrade pip \
         && .venv/bin/python -m pip install -q -c constraints.txt -e '.[dev,postgres]'; } >"$log" 2>&1; then
    grep -v '^WARNING: Location' "$log" >&2
    echo "bootstrap: installing Python packages failed" >&2
    exit 1
  fi
  rm -f "$log"
  .venv/bin/python -c 'import exchange, regorus, fhir.resources.R4B, pydicom'
  echo "$want" > "$stamp"
fi
