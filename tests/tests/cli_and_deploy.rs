//! The `tandem` CLI against a real one-node site, and the compose file's validity.

use std::process::Command;

use anyhow::Result;
use tandem_lab::lab::{Lab, binary};

fn tandem(endpoint: &str, args: &[&str]) -> std::process::Output {
    Command::new(binary("tandem"))
        .args(["-e", endpoint])
        .args(args)
        .output()
        .expect("run tandem (cargo build --bins first)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_creates_from_spec_files_prints_json_and_fails_in_one_line() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut lab = Lab::up(&dir.path().join("lab"), 1, 1).await?;
    let api = lab.sites[0][0].api.clone();

    let out = tandem(&api, &["cluster", "status", "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["leader"], 1, "{v}");
    assert_eq!(v["nodes"].as_array().map(|n| n.len()), Some(1), "{v}");

    let host = dir.path().join("host.yaml");
    std::fs::write(&host, "id: h1\nname: esx-01\nvra_address: 127.0.0.1:9100\n")?;
    let out = tandem(&api, &["host", "create", "-f", host.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ds = dir.path().join("ds.toml");
    std::fs::write(
        &ds,
        "id = \"d1\"\nname = \"fast\"\nhost = \"h1\"\npath = \"/data/fast\"\ncapacity = \"2TiB\"\n",
    )?;
    let out = tandem(&api, &["datastore", "create", "-f", ds.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = tandem(&api, &["datastore", "get", "d1", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["capacity_bytes"], 2u64 << 40);

    // Errors: one line, non-zero exit.
    let out = tandem(&api, &["vm", "get", "nope"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("not found"), "{err}");
    let out = tandem("127.0.0.1:1", &["host", "list"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no manager reachable"));
    lab.down().await;
    Ok(())
}

#[test]
fn compose_file_is_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new("docker-compose")
        .args(["-f", "docker-compose.yml", "config", "-q"])
        .current_dir(&root)
        .output()
        .expect("docker-compose (Debian package docker-compose) must be installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
