#!/bin/sh
# Create the compose secrets (docs/deploy.md, "Secrets") in DIR (default: ./secrets
# beside this script). Never overwrites a file that exists, so it is safe to run again
# and never rotates a key by accident. The directory is 0700 (other users of this host
# stay out); the files are 0644 because the containers read them as their own users,
# and compose mounts them as they are.
set -eu
dir=${1:-$(dirname "$0")/secrets}
umask 077
mkdir -p "$dir"
chmod 0700 "$dir"

random_hex() { od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'; }
random_b64() { head -c "$1" /dev/urandom | base64 | tr -d '\n'; }

put() {  # put NAME VALUE: write once, atomically
  if [ -e "$dir/$1" ]; then
    echo "kept    $dir/$1"
    return
  fi
  printf '%s\n' "$2" > "$dir/.$1.tmp"
  chmod 0644 "$dir/.$1.tmp"
  mv "$dir/.$1.tmp" "$dir/$1"
  echo "created $dir/$1"
}

database() {  # database PREFIX HOST: the PostgreSQL password and the URL that uses it
  put "$1_db_password" "$(random_hex 24)"
  password=$(cat "$dir/$1_db_password")
  put "$1_database_url" "postgresql+psycopg://exchange:$password@$2:5432/exchange"
}

database hub hub-db
database site_a site-a-db
database site_b site-b-db
# 32 random bytes, base64: each node's master key (it wraps the tenant keys) and the
# backup key (it encrypts database dumps and wraps exported keys). Keep copies offline.
put site_a_master_key "$(random_b64 32)"
put site_b_master_key "$(random_b64 32)"
put backup_key "$(random_b64 32)"
put metrics_token "$(random_hex 32)"
# The nodes' client secrets at the IdP: register these there for clients site-a and
# site-b, or replace the files with the secrets the IdP issued (dev-idp profile:
# `exchange dev client`, see docs/deploy.md).
put site_a_client_secret "$(random_hex 32)"
put site_b_client_secret "$(random_hex 32)"
