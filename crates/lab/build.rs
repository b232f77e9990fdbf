//! Compiles the etcd KV subset the benchmark uses (client only) with protox.

fn main() {
    let dir = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("proto");
    let file = dir.join("etcd_kv.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    let fds = protox::compile([&file], [&dir]).expect("compile etcd proto");
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_fds(fds)
        .expect("generate etcd client");
}
