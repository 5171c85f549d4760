# WRS — WebSocket Relay Service, as a container image.
#
#   docker build -t wrs:latest .
#   docker run -p 8080:8080 wrs:latest
#
# The runtime image is built FROM scratch with deploy/rootfs.sh: the binary,
# exactly the shared libraries it links, CA certificates and an unprivileged
# user — the same files scripts/image.sh (buildah, no Docker engine) puts in
# its image. All configuration comes from WRS_* environment variables.

FROM rust:1.95-slim-bookworm AS builder
WORKDIR /src
# Dependencies first, in their own layer: rebuilt only when a manifest or
# the lockfile changes.
COPY Cargo.toml Cargo.lock ./
COPY crates/wrs/Cargo.toml crates/wrs/Cargo.toml
COPY crates/wrs-bench/Cargo.toml crates/wrs-bench/Cargo.toml
RUN mkdir -p crates/wrs/src crates/wrs-bench/src \
 && printf 'fn main() {}\n' > crates/wrs/src/main.rs \
 && : > crates/wrs/src/lib.rs \
 && printf 'fn main() {}\n' > crates/wrs-bench/src/main.rs \
 && cargo build --release --locked -p wrs \
 && rm -rf crates/wrs/src crates/wrs-bench/src
# Then the sources.
COPY crates crates
COPY deploy/rootfs.sh deploy/rootfs.sh
RUN touch crates/wrs/src/main.rs crates/wrs/src/lib.rs \
 && cargo build --release --locked -p wrs \
 && deploy/rootfs.sh target/release/wrs /rootfs

FROM scratch
COPY --from=builder /rootfs/ /
USER 65532:65532
ENV WRS_API_PORT=8080 \
    WRS_BIND_ADDRESS=0.0.0.0 \
    WRS_LOG_FORMAT=json
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=4s --start-period=5s --retries=3 CMD ["/wrs", "healthcheck"]
ENTRYPOINT ["/wrs"]
