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
    // Reflection needs the encoded descriptors at run time: one set per
    // socket, each file with what it imports, so that neither socket can
    // describe the other's services, not even asked for them by name.
    for (name, root) in [
        ("workload_descriptor.bin", "spiffe/workload.proto"),
        ("admin_descriptor.bin", "writ/admin/v1/admin.proto"),
    ] {
        let set = with_imports(&descriptors, root);
        std::fs::write(out_dir.join(name), prost::Message::encode_to_vec(&set))?;
    }
    // CRLs can reach megabytes and go to every stream in every message:
    // as `Bytes`, each message shares the signed CRL instead of copying it.
    // Each message's buffer sized before it is encoded (src/grpc_codec.rs).
    tonic_prost_build::configure()
        .codec_path("crate::grpc_codec::SizedProstCodec")
        .bytes(".X509SVIDResponse.crl")
        .bytes(".X509BundlesResponse.crl")
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}

/// The files of `all` that `root` needs: itself and what it imports, in
/// an order where each file follows its imports.
fn with_imports(
    all: &prost_types::FileDescriptorSet,
    root: &str,
) -> prost_types::FileDescriptorSet {
    fn visit<'a>(
        all: &'a prost_types::FileDescriptorSet,
        name: &str,
        out: &mut Vec<&'a prost_types::FileDescriptorProto>,
    ) {
        let Some(file) = all.file.iter().find(|f| f.name() == name) else {
            return;
        };
        if out.iter().any(|f| f.name() == name) {
            return;
        }
        for import in &file.dependency {
            visit(all, import, out);
        }
        out.push(file);
    }
    let mut files = Vec::new();
    visit(all, root, &mut files);
    prost_types::FileDescriptorSet {
        file: files.into_iter().cloned().collect(),
    }
}
