#!/usr/bin/env bash
# Install the Debian packages the benchmarks compare against, idempotently:
# Orthanc and its DICOMweb plugin (benchmarks/ingest.py). Kept out of
# scripts/bootstrap.sh so that `make test` stays quick.
#
# A package this Debian does not carry is reported and skipped (exit 0): the
# benchmark then measures Exchange alone and says why.
set -euo pipefail

PACKAGES=(orthanc orthanc-dicomweb)

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

installed() {
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

missing=()
for pkg in "${PACKAGES[@]}"; do
  installed "$pkg" || missing+=("$pkg")
done
if [ "${#missing[@]}" -eq 0 ]; then
  echo "benchmark-deps: ${PACKAGES[*]} already installed"
  exit 0
fi

if ! command -v apt-get >/dev/null; then
  echo "benchmark-deps: no apt-get on this machine; cannot install ${missing[*]}." \
       "The benchmarks will measure Exchange only." >&2
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq

available=()
for pkg in "${missing[@]}"; do
  candidate=$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2}')
  if [ -z "$candidate" ] || [ "$candidate" = "(none)" ]; then
    echo "benchmark-deps: Debian package '$pkg' does not exist in this machine's repositories;" \
         "skipping it. The benchmarks will leave out what needs it and say so." >&2
  else
    available+=("$pkg")
  fi
done
if [ "${#available[@]}" -eq 0 ]; then
  exit 0
fi

echo "benchmark-deps: installing ${available[*]}"
# The package's own service is not wanted: the benchmark starts Orthanc itself,
# in a private network namespace. policy-rc.d keeps the maintainer scripts from
# starting it on installation where a service manager would.
policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
  $SUDO chmod +x "$policy"
  own_policy=1
fi
status=0
$SUDO apt-get install -y -qq --no-install-recommends "${available[@]}" >/dev/null || status=$?
[ "$own_policy" -eq 0 ] || $SUDO rm -f "$policy"
if [ "$status" -ne 0 ]; then
  echo "benchmark-deps: installing ${available[*]} failed (apt-get exit $status);" \
       "the benchmarks will measure Exchange only." >&2
  exit 0
fi
# The benchmark runs its own Orthanc; keep the packaged service (which listens on every
# interface) from starting at boot on a machine with a service manager.
for pkg in "${available[@]}"; do
  [ "$pkg" = orthanc ] || continue
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now orthanc.service >/dev/null 2>&1 || true
  elif command -v update-rc.d >/dev/null && [ -e /etc/init.d/orthanc ]; then
    $SUDO update-rc.d orthanc disable >/dev/null 2>&1 || true
  fi
  echo "benchmark-deps: the packaged orthanc service is disabled; benchmarks start their own"
done
echo "benchmark-deps: done"
