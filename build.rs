//! Compiles the broker's gRPC API and the public SPIFFE Workload API with protox,
//! so no `protoc` binary is needed on the build machine, and keeps their descriptors for
//! gRPC reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/spiffe_broker/v1/broker.proto",
        "proto/spiffe/workload/workload.proto",
        // OTLP (the audit sink's exporter; the tests' receiver).
        "proto/opentelemetry/proto/collector/logs/v1/logs_service.proto",
        "proto/opentelemetry/proto/collector/trace/v1/trace_service.proto",
    ];
    let includes = ["proto", "proto/spiffe/workload"];
    let fds = protox::compile(protos, includes)?;
    // The broker's own API (not the Workload API, served elsewhere), for gRPC reflection.
    let api = protox::compile([protos[0]], includes)?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("descriptors.bin"),
        prost::Message::encode_to_vec(&api),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
