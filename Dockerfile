# syntax=docker/dockerfile:1.7
# Two images from one build:
#   docker build --target node     -t distcache/node:dev .
#   docker build --target operator -t distcache/operator:dev .
# Both run as a non-root user (65532) and need no writable root filesystem
# (the node writes only to its WAL volume, the operator nowhere).

ARG RUST_VERSION=1.95
ARG VERSION=0.1.0

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# Dependencies first, so that source changes reuse the cached registry.
COPY Cargo.toml Cargo.lock ./
COPY client client
COPY node node
COPY operator operator
COPY e2e e2e
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
        -p distcache-node -p distcache-operator -p distcache-client --bins \
 && mkdir -p /out \
 && cp target/release/distcache-node target/release/distcache-operator target/release/distcache /out/

FROM gcr.io/distroless/cc-debian12:nonroot AS runtime-base
ARG VERSION
LABEL org.opencontainers.image.source="https://github.com/distcache/distcache" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="distcache" \
      org.opencontainers.image.version="${VERSION}"
USER 65532:65532

FROM runtime-base AS node
LABEL org.opencontainers.image.title="distcache-node" \
      org.opencontainers.image.description="distcache node: partitioned in-memory cache served over gRPC"
COPY --from=build /out/distcache-node /out/distcache /usr/local/bin/
# gRPC (clients), peer protocol (members).
EXPOSE 7100 7200 9100
ENV DISTCACHE_LISTEN=0.0.0.0:7100
ENTRYPOINT ["/usr/local/bin/distcache-node"]

FROM runtime-base AS operator
LABEL org.opencontainers.image.title="distcache-operator" \
      org.opencontainers.image.description="Kubernetes operator for DistributedCacheClusters"
COPY --from=build /out/distcache-operator /usr/local/bin/
# /metrics, /healthz, /readyz.
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/distcache-operator"]
