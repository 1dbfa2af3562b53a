#!/bin/sh
# Create or update a Mosquitto password file for fedge.
#   sh make-passwords.sh passwords coordinator pi-01 pi-02 ...
# Prompts for nothing: generates a random password per new user and prints
# "user password" lines on stdout (store them in each device's agent.toml).
# Existing users keep their password unless FORCE=1.
set -eu
[ $# -ge 2 ] || { echo "usage: $0 PASSWORD_FILE USER..." >&2; exit 2; }
file=$1; shift
command -v mosquitto_passwd >/dev/null 2>&1 || { echo "mosquitto_passwd not found (apt-get install mosquitto)" >&2; exit 1; }
[ -f "$file" ] || { : > "$file"; chmod 600 "$file"; }
for user in "$@"; do
  case "$user" in
    *[!A-Za-z0-9_.:@-]*|''|[.:@-]*) echo "skipping invalid id: $user" >&2; continue;;
  esac
  if grep -q "^$user:" "$file" && [ "${FORCE:-0}" != 1 ]; then
    echo "kept $user" >&2; continue
  fi
  pw=$(openssl rand -base64 18)
  mosquitto_passwd -b "$file" "$user" "$pw"
  echo "$user $pw"
done
