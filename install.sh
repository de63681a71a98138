#!/usr/bin/env bash
# Install cramfs on a Debian machine, as root: the system packages pyfuse3 builds against,
# a virtualenv at .venv in this checkout, and the project in it.
#   ./install.sh          the daemon and the admin tool (.venv/bin/cramfsd, .venv/bin/cramfs)
#   ./install.sh --test   also the test tools: pytest, hypothesis, ruff, fio, stress-ng,
#                         prometheus (promtool), so `.venv/bin/python -m pytest -v` runs it all
set -euo pipefail
cd "$(dirname "$0")"

extras=daemon
packages=(fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv util-linux kmod procps)
if [[ "${1:-}" == "--test" ]]; then
    extras=dev
    packages+=(fio stress-ng prometheus systemd)
fi

export DEBIAN_FRONTEND=noninteractive
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" \
        || missing+=("$package")
done
if ((${#missing[@]})); then
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[$extras]"
echo "installed: $(pwd)/.venv/bin/cramfsd and $(pwd)/.venv/bin/cramfs"
