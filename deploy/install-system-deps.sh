#!/bin/sh
# Install the Debian / Raspberry Pi OS packages fedge needs when they are missing:
# python3-venv (the virtualenv), gcc and Python headers (the kernels, and their
# AddressSanitizer build in `make test`),
# and mosquitto (the MQTT broker the simulator and the tests start on loopback).
set -eu
need=""
{ command -v cc >/dev/null 2>&1 && command -v gcc >/dev/null 2>&1; } || need="$need build-essential python3-dev"
python3 -c "import venv, ensurepip" >/dev/null 2>&1 || need="$need python3-venv"
{ command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto; } || need="$need mosquitto"
[ -z "$need" ] && exit 0
if [ "$(id -u)" -eq 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
  echo "fedge: please install:$need (as root: apt-get install -y$need)" >&2; exit 1
fi
echo "fedge: installing Debian packages:$need"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends $need
# The Debian package starts a system-wide broker on port 1883; fedge never uses it
# (it starts its own on a free loopback port), so it is left as the package set it up.
