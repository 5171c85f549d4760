#!/bin/sh
# Assembles the root file system of the WRS container image into DEST:
#   /wrs                      the binary
#   the shared libraries it links (exactly those ldd lists) and the loader
#   /etc/ssl/certs/ca-certificates.crt  for TLS to NATS with public CAs
#   /etc/passwd, /etc/group   an unprivileged user wrs (65532)
#   /tmp                      empty (the service writes nothing)
# Both the Dockerfile's runtime stage and scripts/image.sh (buildah) use
# this script, so both images hold the same files.
set -eu
bin=$1
dest=$2
mkdir -p "$dest/etc/ssl/certs" "$dest/tmp"
chmod 1777 "$dest/tmp"
install -m 0755 "$bin" "$dest/wrs"
ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u |
  while read -r lib; do
    cp -L --parents "$lib" "$dest"
  done
cp /etc/ssl/certs/ca-certificates.crt "$dest/etc/ssl/certs/"
printf 'root:x:0:0:root:/:/sbin/nologin\nwrs:x:65532:65532:wrs:/:/sbin/nologin\n' >"$dest/etc/passwd"
printf 'root:x:0:\nwrs:x:65532:\n' >"$dest/etc/group"
