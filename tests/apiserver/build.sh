#!/usr/bin/env bash
# Builds the test API server (lb-apiserver/main.go) and fetches etcd, from
# Debian sid's packages (Go source of k8s.io/apiserver and friends, Go 1.27,
# etcd-server 3.5), without touching the system's apt configuration.
# Idempotent: the binaries are cached in $LB_APISERVER_CACHE (default
# /var/cache/lb-apiserver) and rebuilt only when main.go changes. Fails loudly.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${LB_APISERVER_CACHE:-/var/cache/lb-apiserver}
WORK=$CACHE/work
BIN=$CACHE/bin
SOURCE_HASH=$(sha256sum "$HERE/lb-apiserver/main.go" "$HERE/build.sh" | sha256sum | cut -d' ' -f1)
log() { printf '[apiserver] %s\n' "$*"; }

if [ -x "$BIN/lb-apiserver" ] && [ -x "$BIN/etcd" ] && [ "$(cat "$BIN/.source-hash" 2>/dev/null)" = "$SOURCE_HASH" ]; then
    log "cached in $BIN"
    exit 0
fi

ROOT=$WORK/root
if [ ! -x "$ROOT/usr/lib/go-1.27/bin/go" ] || [ ! -d "$ROOT/usr/share/gocode/src/k8s.io/apiserver" ] || [ ! -x "$ROOT/usr/bin/etcd" ]; then
    log "fetching Debian sid packages (Go, k8s.io staging sources, etcd) into $WORK"
    mkdir -p "$WORK"/{lists/partial,cache/archives/partial,etc,debs}
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian sid main" > "$WORK/etc/sources.list"
    APT=(-o "Dir::Etc::sourcelist=$WORK/etc/sources.list" -o "Dir::Etc::sourceparts=-" -o "Dir::State::Lists=$WORK/lists"
         -o "Dir::Cache=$WORK/cache" -o "Debug::NoLocking=1")
    apt-get "${APT[@]}" -q update
    apt-cache "${APT[@]}" depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
        --no-replaces --no-enhances golang-k8s-apiserver-dev golang-k8s-api-dev golang-k8s-apimachinery-dev \
        golang-k8s-client-go-dev golang-k8s-component-base-dev \
        | grep -E '^golang-' | grep -v -E '^golang-(go|src|doc|any)$|-doc$' | sort -u > "$WORK/packages"
    for p in golang-1.27-go golang-1.27-src etcd-server; do grep -qx "$p" "$WORK/packages" || echo "$p" >> "$WORK/packages"; done
    (cd "$WORK/debs" && apt-get "${APT[@]}" -q download $(cat "$WORK/packages"))
    rm -rf "$ROOT"
    mkdir -p "$ROOT"
    for deb in "$WORK"/debs/*.deb; do dpkg-deb -x "$deb" "$ROOT"; done
    # Record what was built from: sid moves daily.
    for deb in "$WORK"/debs/*.deb; do dpkg-deb -f "$deb" Package Version | paste -sd' '; done > "$WORK/versions"
    rm -rf "$WORK/debs" "$WORK/cache"
fi

log "building lb-apiserver ($(grep -E '^Package: golang-k8s-apiserver-dev ' "$WORK/versions" 2>/dev/null || echo 'versions unknown'))"
mkdir -p "$WORK/gopath/src" "$BIN"
rm -rf "$WORK/gopath/src/lb-apiserver"
cp -r "$HERE/lb-apiserver" "$WORK/gopath/src/lb-apiserver"
export GOROOT=$ROOT/usr/lib/go-1.27 GOPATH=$WORK/gopath:$ROOT/usr/share/gocode GOCACHE=$WORK/gocache
export GO111MODULE=off GOPROXY=off GOTOOLCHAIN=local GOFLAGS= GOTELEMETRY=off
(cd "$WORK/gopath/src/lb-apiserver" && "$GOROOT/bin/go" build -o "$BIN/lb-apiserver.new" .) || {
    echo "[apiserver] BUILD FAILED: the k8s.io packages in sid may have changed their API; see above" >&2
    exit 1
}
mv "$BIN/lb-apiserver.new" "$BIN/lb-apiserver"
cp "$ROOT/usr/bin/etcd" "$BIN/etcd"
cp "$WORK/versions" "$BIN/VERSIONS" 2>/dev/null || true
echo "$SOURCE_HASH" > "$BIN/.source-hash"
log "built $BIN/lb-apiserver and $BIN/etcd"
