//! Compiles, with protox, the etcd KV subset the benchmark uses (client only) and the lab's
//! own `tandem.lab.v1` link control service (server and client).

fn main() {
    let dir = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("proto");
    let etcd = dir.join("etcd_kv.proto");
    let link = dir.join("lab_link.proto");
    println!("cargo:rerun-if-changed={}", etcd.display());
    println!("cargo:rerun-if-changed={}", link.display());
    let fds = protox::compile([&etcd], [&dir]).expect("compile etcd proto");
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_fds(fds)
        .expect("generate etcd client");
    let fds = protox::compile([&link], [&dir]).expect("compile lab link proto");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)
        .expect("generate lab link control");
}
