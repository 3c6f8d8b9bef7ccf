//! Compiles the broker's gRPC API and the public SPIFFE Workload API with protox,
//! so no `protoc` binary is needed on the build machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/spiffe_broker/v1/broker.proto",
        "proto/spiffe/workload/workload.proto",
    ];
    let includes = ["proto", "proto/spiffe/workload"];
    let fds = protox::compile(protos, includes)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
