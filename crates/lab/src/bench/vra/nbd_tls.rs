//! NBD over TLS (`nbds://`, a client certificate) vs plain TCP NBD, fio's nbd engine.

use std::path::Path;

use anyhow::Result;

use tandem_testkit::yardstick::cpu_secs;

use super::files::*;
use super::fio::*;
use super::machine::*;
use super::settings::*;
use super::tls::{TlsRun, best_run, protected_pair};

/// 4 KiB randwrite QD32 from fio's nbd engine (libnbd) on a protected volume over TCP:
/// with TLS (`nbds://`, the site's NBD client certificate, VRAs with mutual TLS between
/// them) vs plain TCP NBD (an `--insecure` VRA pair). The TLS side carries TLS on the
/// replication link too, so the ratio bounds NBD's TLS cost from below. A third run per
/// round, the TLS pair through its Unix socket, shows the host-local path beside them.
pub(super) async fn bench_nbd_tls(s: &Settings, rows: &mut Vec<Row>, round: usize) -> Result<()> {
    let root = fresh_dir(&s.dir.join("nbd-tls"))?;
    let ca = tandem_tls::pki::SiteCa::generate("site-bench")?;
    let certs = root.join("nbd-client");
    ca.provision_nbd_client(&certs, "bench")?;
    // (name, the VRAs' CA, the client's certificates, through the Unix socket)
    type Mode<'a> = (
        &'a str,
        Option<&'a tandem_tls::pki::SiteCa>,
        Option<&'a Path>,
        bool,
    );
    let modes: [Mode; 3] = [
        ("plain TCP NBD", None, None, false),
        ("NBD over TLS", Some(&ca), Some(&certs), false),
        ("TLS pair, Unix socket", Some(&ca), None, true),
    ];
    // Each mode twice per round, mirrored (A B C C B A), starting one further each round.
    let order: Vec<usize> = (0..3)
        .map(|i| (i + round) % 3)
        .chain((0..3).rev().map(|i| (i + round) % 3))
        .collect();
    println!(
        "\n== NBD over TLS vs plain TCP NBD: fio 4 KiB randwrite QD32, {} s a run",
        s.write_secs
    );
    let mut runs: [Vec<TlsRun>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    for m in order {
        let (name, tls, client_certs, socket) = modes[m];
        let dir = root.join(format!("run-{m}-{}", runs[m].len()));
        let (a, b) = protected_pair(s, &dir, tls).await?;
        let uri = if socket {
            a.uri("vm-1/0")
        } else {
            a.tcp_uri("vm-1/0")
        };
        let machine = quiet(s).await;
        let a_cpu = cpu_secs(a.pid());
        let r = match client_certs {
            Some(certs) => fio_tls(&uri, certs, s.write_secs, s.volume_bytes).await?,
            None => fio(&[uri], "randwrite", "4k", 32, s.volume_bytes, s.write_secs).await?,
        };
        let a_cpu = cpu_secs(a.pid()) - a_cpu;
        println!("{name}: {} (protected VRA cpu {a_cpu:.1} s)", r.line());
        runs[m].push(TlsRun {
            figure: r.iops,
            shown: format!("{:.0}", r.iops),
            machine,
        });
        drop(a);
        drop(b);
        s.clean(&dir);
    }
    let [(plain, plain_all), (tls, tls_all), (local, local_all)] =
        [best_run(&runs[0]), best_run(&runs[1]), best_run(&runs[2])];
    let ratio = tls.figure / plain.figure.max(1e-9);
    println!(
        "ratio NBD over TLS: {ratio:.2}x plain TCP NBD (the better run of each: plain \
         {plain_all} IOPS, TLS {tls_all} IOPS; the TLS pair through its Unix socket \
         {local_all} IOPS, {:.2}x)",
        local.figure / plain.figure.max(1e-9)
    );
    rows.push(Row {
        bench: "NBD over TLS: 4 KiB randwrite QD32".into(),
        tandem: format!("{:.0} IOPS over nbds:// (runs {tls_all})", tls.figure),
        yardstick: format!(
            "{:.0} IOPS over plain nbd:// (runs {plain_all})",
            plain.figure
        ),
        ratio: format!("{ratio:.2}x"),
        figure: ratio,
        unit: "x plain TCP NBD",
        floor: ">= 0.85x".into(),
        met: ratio >= 0.85,
        machine: format!("{} / {}", plain.machine, tls.machine),
    });
    s.clean(&root);
    Ok(())
}
