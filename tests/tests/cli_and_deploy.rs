//! The `tandem` CLI against a real one-node site, and the compose file's validity.

use std::process::Command;

use anyhow::Result;
use tandem_testkit::lab::Lab;
use tandem_testkit::process::binary;

fn tandem(endpoint: &str, args: &[&str]) -> std::process::Output {
    tandem_testkit::operator::cli()
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

    // A reader that closes the pipe at once (`tandem event list | head -0`): the CLI ends
    // quietly with status 0.
    let mut child = tandem_testkit::operator::cli()
        .args(["-e", &api, "event", "list"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    drop(child.stdout.take());
    let out = child.wait_with_output()?;
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );

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

#[test]
fn tandem_lab_serve_exports_each_file_to_real_clients() {
    let dir = tempfile::tempdir().unwrap();
    for (name, fill) in [("alpha", 0xa5u8), ("beta", 0x5a)] {
        std::fs::write(dir.path().join(format!("{name}.img")), vec![fill; 1 << 20]).unwrap();
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = Command::new(binary("tandem-lab"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .arg(dir.path().join("alpha.img"))
        .arg(dir.path().join("beta.img"))
        .spawn()
        .expect("start tandem-lab serve");
    let uri = format!("nbd://127.0.0.1:{port}");
    let mut listed = None;
    for _ in 0..100 {
        let out = Command::new("nbdinfo")
            .args(["--list", &uri])
            .output()
            .expect("nbdinfo (libnbd-bin)");
        if out.status.success() {
            listed = Some(String::from_utf8_lossy(&out.stdout).to_string());
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let listed = listed.expect("tandem-lab serve did not answer nbdinfo --list");
    assert!(
        listed.contains("alpha") && listed.contains("beta"),
        "{listed}"
    );
    let copy = dir.path().join("copy.raw");
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &format!("{uri}/beta")])
        .arg(&copy)
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&copy).unwrap(), vec![0x5a; 1 << 20]);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(
        server.wait().unwrap().success(),
        "serve did not stop cleanly on SIGTERM"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lab_with_hosts_starts_vras_lists_them_and_registers_them_as_hosts() -> Result<()> {
    use tandem_proto::v1;
    use tandem_proto::v1::vra_control_client::VraControlClient;

    let dir = tempfile::tempdir()?;
    let mut lab = Lab::up(&dir.path().join("lab"), 2, 1).await?;
    lab.start_vras(2).await?;
    let file = tandem_testkit::lab::LabFile::read(&lab.dir)?;
    for (i, site) in file.sites.iter().enumerate() {
        assert_eq!(site.vras.len(), 2, "{site:?}");
        let out = tandem(&lab.sites[i][0].api, &["host", "list", "-o", "json"]);
        let hosts: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        for v in &site.vras {
            assert!(v.pid > 0);
            let listed = hosts["hosts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|h| h["id"] == v.host.as_str() && h["vra_address"] == v.control.as_str());
            assert!(listed, "{} not registered: {hosts}", v.host);
            let ch = lab.vra_channel(&v.control).await?;
            VraControlClient::new(ch)
                .get_status(v1::GetVraStatusRequest {})
                .await?;
        }
    }
    lab.down().await;
    Ok(())
}

/// `tandem-lab up --example`: one command leaves a VPG of 4 VMs on 2 hosts protecting,
/// created through the CLI from deploy/examples' spec files; lab.json lists every VM's
/// volumes with NBD addresses that a real client (nbdinfo) reads.
#[test]
fn lab_up_example_leaves_a_vpg_protecting_with_its_volumes_in_lab_json() {
    let dir = tempfile::tempdir().unwrap();
    let lab_dir = dir.path().join("lab");
    let mut child = Command::new(binary("tandem-lab"))
        .args(["up", "--example", "--dir"])
        .arg(&lab_dir)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start tandem-lab up --example");
    let start = std::time::Instant::now();
    let file = loop {
        if let Ok(f) = tandem_testkit::lab::LabFile::read(&lab_dir)
            && !f.vms.is_empty()
        {
            break f;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("tandem-lab up --example exited: {status}");
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(240),
            "no example VPG in lab.json"
        );
        std::thread::sleep(std::time::Duration::from_millis(250));
    };
    assert_eq!(file.vms.len(), 4, "{:?}", file.vms);
    let hosts: std::collections::BTreeSet<_> = file.vms.iter().map(|v| &v.host).collect();
    assert_eq!(hosts.len(), 2, "{:?}", file.vms);
    let volume = &file.vms[0].volumes[0];
    let out = Command::new("nbdinfo")
        .args(["--size", &volume.uri])
        .output()
        .expect("nbdinfo (libnbd-bin)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        volume.size_bytes.to_string()
    );
    let api = &file.sites[0].managers[0].api;
    file.use_credentials().expect("the lab's token");
    let out = tandem(api, &["vpg", "get", &file.vms[0].vpg, "-o", "json"]);
    let g: serde_json::Value = serde_json::from_slice(&out.stdout).expect("vpg json");
    assert_eq!(g["status"]["status"], "Meeting SLA", "{g}");
    assert!(lab_dir.join("specs/vpg-web.yaml").exists());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    assert!(
        child.wait().unwrap().success(),
        "the lab did not stop cleanly"
    );
}
