#!/usr/bin/env bash
# Install cramfs on a Debian machine, as root: the system packages pyfuse3 builds against,
# a virtualenv at .venv in this checkout, and the project in it.
#   ./install.sh          the daemon and the admin tool (.venv/bin/cramfsd, .venv/bin/cramfs)
#   ./install.sh --test   also the test tools: pytest, hypothesis, ruff, fio, stress-ng,
#                         prometheus (promtool), so `.venv/bin/python -m pytest -v` runs it all
#
# pyfuse3 is built from its 3.5.0 sdist with patches/pyfuse3-3.5.0-fallocate.patch applied, so
# the kernel's FUSE_FALLOCATE requests (how loop devices pass discards on) reach the daemon; stock
# 3.5.0 has no fallocate handler. The build is skipped when .venv already has the patched pyfuse3.
set -euo pipefail
cd "$(dirname "$0")"

PYFUSE3_VERSION=3.5.0
PYFUSE3_SHA256=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
PYFUSE3_PATCH=patches/pyfuse3-3.5.0-fallocate.patch
# The local label keeps `pip list` honest and still satisfies pyproject's pyfuse3==3.5.0.
PYFUSE3_BUILD_VERSION=$PYFUSE3_VERSION+fallocate
# The Cython 3.5.0's shipped C was generated with; setuptools/setuptools_scm as its pyproject asks.
PYFUSE3_BUILD_DEPS=("Cython==3.2.4" "setuptools>=78.1.1" "setuptools_scm>=8")

die() { echo "install.sh: error: $*" >&2; exit 1; }

extras=daemon
packages=(fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv patch util-linux kmod
          procps liblzo2-dev)
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
    apt-get install -y -q --no-install-recommends "${missing[@]}" \
        || die "apt-get install ${missing[*]} failed"
fi

python3 -m venv .venv || die "python3 -m venv .venv failed (apt-get install python3-venv)"
pip=(.venv/bin/python -m pip)
"${pip[@]}" install -q --upgrade pip || die "could not upgrade pip in .venv"

# True when .venv's pyfuse3 has the fallocate handler: Operations.fallocate (pure Python) and the
# compiled fuse_fallocate_async, which only exists if the C was regenerated from the patched .pyx.
# With an argument it says why not on stderr.
has_fallocate() {
    local check='import pyfuse3, sys
if not hasattr(pyfuse3.Operations, "fallocate"):
    sys.exit(f"pyfuse3 {pyfuse3.__version__} has no Operations.fallocate")
if not hasattr(pyfuse3, "fuse_fallocate_async"):
    sys.exit(f"pyfuse3 {pyfuse3.__version__}: Operations.fallocate but no compiled handler")'
    if (($#)); then .venv/bin/python -c "$check"; else .venv/bin/python -c "$check" 2>/dev/null; fi
}

build_pyfuse3() {
    local build started=$SECONDS
    build=$(mktemp -d -t cramfs-pyfuse3.XXXXXX)
    # shellcheck disable=SC2064  # expand $build now
    trap "rm -rf '$build'" EXIT
    echo "building pyfuse3 $PYFUSE3_BUILD_VERSION (with $PYFUSE3_PATCH) in $build"

    "${pip[@]}" download -q --no-binary :all: --no-deps -d "$build" "pyfuse3==$PYFUSE3_VERSION" \
        || die "could not download the pyfuse3 $PYFUSE3_VERSION sdist from PyPI"
    local sdist=$build/pyfuse3-$PYFUSE3_VERSION.tar.gz
    [[ -f $sdist ]] || die "pip download gave no $sdist"
    echo "$PYFUSE3_SHA256  $sdist" | sha256sum -c --quiet - \
        || die "$sdist does not have the expected sha256 $PYFUSE3_SHA256"
    tar -xzf "$sdist" -C "$build" || die "could not unpack $sdist"

    local src=$build/pyfuse3-$PYFUSE3_VERSION
    patch -d "$src" -p1 --batch --forward --quiet <"$PYFUSE3_PATCH" \
        || die "$PYFUSE3_PATCH does not apply to the pyfuse3 $PYFUSE3_VERSION sdist"
    # The sdist ships C generated from the unpatched .pyx. Delete it so the build must run Cython
    # on the patched sources (without Cython it then fails instead of silently using stale C).
    rm -f "$src/src/pyfuse3/__init__.c"

    "${pip[@]}" install -q "${PYFUSE3_BUILD_DEPS[@]}" \
        || die "could not install pyfuse3's build tools (${PYFUSE3_BUILD_DEPS[*]})"
    # No build isolation: the build uses .venv's pinned Cython. The pretend version stops
    # setuptools_scm from looking for version control and adds the local label.
    SETUPTOOLS_SCM_PRETEND_VERSION_FOR_PYFUSE3=$PYFUSE3_BUILD_VERSION \
        "${pip[@]}" wheel -q --no-build-isolation --no-deps -w "$build/dist" "$src" \
        || die "building the patched pyfuse3 failed (needs gcc, python3-dev, libfuse3-dev, pkg-config)"
    local wheel
    wheel=$(echo "$build"/dist/pyfuse3-*.whl)
    [[ -f $wheel ]] || die "the pyfuse3 build left no wheel in $build/dist"
    # Replace whatever pyfuse3 .venv has (a stock 3.5.0 too), then add its dependencies (trio).
    "${pip[@]}" install -q --force-reinstall --no-deps "$wheel" \
        && "${pip[@]}" install -q "$wheel" \
        || die "could not install $wheel"

    rm -rf "$build"
    trap - EXIT
    has_fallocate verbose || die "the pyfuse3 just built has no fallocate handler"
    echo "built pyfuse3 $PYFUSE3_BUILD_VERSION in $((SECONDS - started))s"
}

if has_fallocate; then
    echo "pyfuse3 with fallocate already in .venv; not rebuilding"
else
    build_pyfuse3
fi

"${pip[@]}" install -q -e ".[$extras]" || die "pip install -e .[$extras] failed"
# pip keeps the patched pyfuse3 (it satisfies pyfuse3==3.5.0); make sure it really did.
has_fallocate verbose \
    || die "pip install -e .[$extras] replaced the patched pyfuse3 with one lacking fallocate"
echo "installed: $(pwd)/.venv/bin/cramfsd and $(pwd)/.venv/bin/cramfs"
