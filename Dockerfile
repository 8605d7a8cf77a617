# reproject as a container: `docker build -t reproject .`, then for example
#   docker run --rm -p 9464:9464 -e REPROJECT_BROKERS=kafka:9092 \
#     -e DATABASE_URL=postgres://user:pass@db:5432/app reproject run --metrics-addr 0.0.0.0:9464
# Probes: /healthz (liveness) and /readyz (readiness) on the metrics address (see README).
#
# A team's own crate (a binary calling `reproject::cli::main(YourDomain)`) builds with the same file:
# copy it into that crate's repository and set PACKAGE and BIN to its package and binary names; the
# ledger example in this workspace builds with
#   docker build --build-arg PACKAGE=reproject-ledger --build-arg BIN=reproject-ledger -t ledger .

# --- build -------------------------------------------------------------------------------------
# The Debian image has what librdkafka's bundled build needs (a C toolchain, make, libssl-dev,
# zlib1g-dev, pkg-config); protos compile with protox, so no protoc.
FROM rust:1-bookworm AS build
ARG PACKAGE=reproject
ARG BIN=reproject
WORKDIR /src
COPY . .
# Caches keep the crate downloads and compiled dependencies between builds (BuildKit).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p "$PACKAGE" --bin "$BIN" \
    && cp "target/release/$BIN" /usr/local/bin/reproject

# --- run ---------------------------------------------------------------------------------------
# Only what the binary links dynamically: glibc, OpenSSL 3 and zlib (checked with `ldd`), plus CA
# certificates for TLS to managed Kafka and PostgreSQL.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home reproject
COPY --from=build /usr/local/bin/reproject /usr/local/bin/reproject
USER 10001
EXPOSE 9464
ENTRYPOINT ["reproject"]
CMD ["run", "--metrics-addr", "0.0.0.0:9464"]
