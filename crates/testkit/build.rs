//! Compiles, with protox, the lab's `tandem.lab.v1` link control service (server and
//! client).

fn main() {
    let dir = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("proto");
    let link = dir.join("lab_link.proto");
    println!("cargo:rerun-if-changed={}", link.display());
    let fds = protox::compile([&link], [&dir]).expect("compile lab link proto");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)
        .expect("generate lab link control");
}
