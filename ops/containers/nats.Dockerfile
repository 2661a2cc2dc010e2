# ops/test-containers' stand-in for the nats:2.15.1-alpine image the compose files name, which
# cannot be pulled here: the same nats-server release (the binary ops/install-nats-server
# installs, checked by its hash), on the local Debian base, with wget for the compose files'
# health checks. The official image's entrypoint puts `nats-server` before arguments starting
# with `-`; every compose command here starts with `-c`, so ENTRYPOINT nats-server runs the very
# same command line. It runs as root, like the official image.
FROM debian:bookworm-slim
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget \
 && rm -rf /var/lib/apt/lists/*
COPY nats-server /usr/local/bin/nats-server
EXPOSE 4222 6222 7422 8222
ENTRYPOINT ["nats-server"]
CMD ["--help"]
