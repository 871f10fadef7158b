//! Compiles the protobuf definitions with protox (a pure-Rust protobuf
//! compiler), so building writ never needs a system `protoc`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/spiffe/workload.proto",
        "proto/writ/admin/v1/admin.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    // Reflection needs the encoded descriptor set at run time.
    let descriptor_path = out_dir.join("writ_descriptor.bin");
    std::fs::write(
        &descriptor_path,
        prost::Message::encode_to_vec(&descriptors),
    )?;
    // CRLs can reach megabytes and go to every stream in every message:
    // as `Bytes`, each message shares the signed CRL instead of copying it.
    tonic_prost_build::configure()
        .bytes(".X509SVIDResponse.crl")
        .bytes(".X509BundlesResponse.crl")
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
