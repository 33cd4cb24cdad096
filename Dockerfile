# The image deployment.yaml names (dataplane/dataplane:dev):
#   docker build -t dataplane/dataplane:dev .
# Build: the Rust toolchain plus clang and the libbpf headers for the eBPF
# programs. Run: a slim Debian with the agent and the CNI plugin.
FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends clang-19 llvm-19 libbpf-dev linux-libc-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p dataplane --bin dataplane -p dataplane-cni --bin dataplane-cni

FROM debian:bookworm-slim
# nft and ip write the return path that lets applications see their clients'
# addresses (see dataplane/src/control/return_path.rs).
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables iproute2 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/dataplane /usr/local/bin/dataplane
# The CNI plugin, copied onto each node by `dataplane cni install`.
COPY --from=build /src/target/release/dataplane-cni /usr/local/bin/dataplane-cni
ENTRYPOINT ["/usr/local/bin/dataplane"]
CMD ["run"]
