//! Compiles, with protox, the etcd KV subset the benchmark uses (client only).

fn main() {
    let dir = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("proto");
    let etcd = dir.join("etcd_kv.proto");
    println!("cargo:rerun-if-changed={}", etcd.display());
    let fds = protox::compile([&etcd], [&dir]).expect("compile etcd proto");
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_fds(fds)
        .expect("generate etcd client");
}
