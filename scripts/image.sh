#!/usr/bin/env bash
# Builds the WRS container image without a Docker engine: buildah (vfs
# storage, no daemon) assembles it FROM scratch out of deploy/rootfs.sh —
# the same files as the Dockerfile's runtime stage — and writes it as an OCI
# archive.
#
#   scripts/image.sh                       # builds release, writes target/wrs-oci.tar
#   podman load -i target/wrs-oci.tar      # or: skopeo copy oci-archive:... docker-daemon:wrs:latest
#
# Environment: WRS_BINARY (use this binary instead of building release),
# WRS_IMAGE_OUT (archive path), WRS_IMAGE_NAME (default wrs:latest).
set -euo pipefail
cd "$(dirname "$0")/.."

out=${WRS_IMAGE_OUT:-target/wrs-oci.tar}
name=${WRS_IMAGE_NAME:-wrs:latest}
if ! command -v buildah >/dev/null 2>&1; then
  echo "== installing buildah (Debian package)"
  if [ "$(id -u)" -eq 0 ]; then apt-get update -qq && apt-get install -y -qq buildah >/dev/null
  else sudo apt-get update -qq && sudo apt-get install -y -qq buildah >/dev/null; fi
fi
binary=${WRS_BINARY:-}
if [ -z "$binary" ]; then
  cargo build --release --locked -p wrs
  binary=target/release/wrs
fi

work=$(mktemp -d)
trap 'buildah "${store[@]}" rm --all >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
# A private, throwaway image store: nothing is left on the machine.
store=(--root "$work/storage" --runroot "$work/run" --storage-driver vfs)

deploy/rootfs.sh "$binary" "$work/rootfs"
container=$(buildah "${store[@]}" from scratch)
buildah "${store[@]}" copy "$container" "$work/rootfs" / >/dev/null
buildah "${store[@]}" config \
  --entrypoint '["/wrs"]' --cmd '' \
  --user 65532:65532 \
  --workingdir / \
  --port 8080/tcp \
  --stop-signal SIGTERM \
  --env WRS_API_PORT=8080 \
  --env WRS_BIND_ADDRESS=0.0.0.0 \
  --env WRS_LOG_FORMAT=json \
  --label org.opencontainers.image.title=wrs \
  --label org.opencontainers.image.description="WRS - WebSocket Relay Service" \
  "$container"
mkdir -p "$(dirname "$out")"
rm -f "$out"
buildah "${store[@]}" commit --quiet --format oci "$container" "oci-archive:$out:$name" >/dev/null
echo "wrote $out ($name, $(du -h "$out" | cut -f1))"
