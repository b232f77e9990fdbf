//! Compiles every `.proto` under the workspace's `proto/` with protox (no system protoc).

use std::{env, fs, path::PathBuf};

fn collect(dir: &std::path::Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("read proto dir") {
        let path = entry.expect("proto dir entry").path();
        if path.is_dir() {
            collect(&path, out);
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path);
        }
    }
}

fn main() {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap()).join("../../proto");
    let mut files = Vec::new();
    collect(&root, &mut files);
    files.sort();
    println!("cargo:rerun-if-changed={}", root.display());
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(&files, [&root]).expect("compile protos");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    fs::write(
        out.join("tandem_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )
    .expect("write descriptor");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Lets the CLI print any message as JSON (`-o json`), and a script or a test read
        // it back.
        .type_attribute(".", "#[derive(serde::Serialize, serde::Deserialize)]")
        // Write payloads stay `Bytes`: decoding slices the receive buffer instead of
        // copying, and the sender hands over its buffer without a copy.
        .bytes(".tandem.v1.ReplicatedWrite.data")
        .compile_fds(fds)
        .expect("generate grpc code");
}
