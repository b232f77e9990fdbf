//! The checkpoint barrier as the managers run it, in a lab of two sites.

use std::time::Duration;

use anyhow::Result;
use tandem_proto::v1::{self as pb};

use super::files::*;
use super::fio::*;
use super::machine::*;
use super::settings::*;

/// The checkpoint barrier as the managers run it: QD32 fio on each of 4 protected VRAs,
/// first with no checkpoints due (interval of an hour), then with the VPG edited to a
/// checkpoint every `cp_interval`; the write stall is the clat difference, and the
/// checkpoints listed by the recovery site in the second run are counted against the
/// intervals.
pub(super) async fn bench_checkpoint_managed(s: &Settings, rows: &mut Vec<Row>) -> Result<()> {
    use pb::vpg_service_client::VpgServiceClient;
    const HOSTS: usize = 4;
    let interval_secs = s.cp_interval.as_secs().max(1);
    println!(
        "\n== checkpoint barrier through the managers: QD32 4 KiB randwrite on each of {HOSTS} \
         protected VRAs (at most {} IOPS each), a checkpoint every {interval_secs} s by the \
         protected site's leader",
        s.managed_iops
    );
    let root = fresh_dir(&s.dir.join("managed"))?;
    let mut lab = tandem_testkit::lab::Lab::up(&root, 2, 3).await?;
    let r = async {
        lab.start_vras_with(HOSTS, &["--ram-mb".into(), s.ram_mb.to_string()])
            .await?;
        let hard = s.journal_limit.max(1 << 30);
        let limit = pb::JournalLimit {
            limit: Some(pb::journal_limit::Limit::Bytes(hard)),
        };
        let warning = pb::JournalLimit {
            limit: Some(pb::journal_limit::Limit::Bytes(hard / 4 * 3)),
        };
        let settings = pb::VpgSettings {
            checkpoint_interval_secs: 3600,
            journal_history_secs: 3600,
            target_rpo_secs: 60,
            journal_hard_limit: Some(limit),
            journal_warning: Some(warning),
            ..Default::default()
        };
        let options = tandem_testkit::protect::ProtectOptions {
            volumes_per_vm: 1,
            vpg: VPG.into(),
            vms: HOSTS,
            volume_bytes: s.volume_bytes,
            memory_mib: 1024,
            settings,
        };
        let p = tandem_testkit::protect::protect(&lab, &options).await?;
        let apis_a = lab.endpoints(0);
        let mut seen = Vec::new();
        let meeting = |g: &pb::Vpg| g.status.as_ref().is_some_and(|s| s.status == "Meeting SLA");
        tandem_testkit::protect::wait_vpg(
            &apis_a,
            VPG,
            Duration::from_secs(900),
            &mut seen,
            meeting,
        )
        .await?;
        let uris: Vec<String> = p
            .vms
            .iter()
            .map(|(vm, h)| {
                tandem_nbd::endpoint_uri(&lab.vras[0][*h].nbd_socket, &format!("{vm}/0"))
            })
            .collect();

        let machine = quiet(s).await;
        let qd32 = || {
            fio_rated(
                &uris,
                "randwrite",
                "4k",
                32,
                s.volume_bytes,
                s.cp_secs,
                s.managed_iops,
            )
        };
        let base = qd32().await?;
        println!("without checkpoints: {}", base.line());
        // No checkpoint for a while: RPO Not Meeting SLA until the edit below brings them.

        // The same VPG, edited to checkpoint at the interval; its VRAs keep their streams.
        let a = tandem_testkit::operator::channel(&lab.sites[0][0].api).await?;
        let g = VpgServiceClient::new(a.clone())
            .get_vpg(pb::GetRequest { id: VPG.into() })
            .await?
            .into_inner();
        let mut settings = g.settings.unwrap_or_default();
        settings.checkpoint_interval_secs = interval_secs;
        let edited = VpgServiceClient::new(a.clone())
            .update_vpg(pb::UpdateVpgRequest {
                id: VPG.into(),
                generation: g.generation,
                spec: Some(pb::VpgSpec {
                    name: g.name,
                    recovery_site_id: p.recovery_site_id.clone(),
                    settings: Some(settings),
                    vms: g.vms.into_iter().filter_map(|v| v.placement).collect(),
                }),
                keep_removed_recovery_disks: false,
            })
            .await?
            .into_inner();
        tandem_testkit::protect::wait_vpg(&apis_a, VPG, Duration::from_secs(600), &mut seen, |g| {
            meeting(g) && g.generation == edited.generation
        })
        .await?;
        tokio::time::sleep(Duration::from_secs(2 * interval_secs)).await;

        let machine2 = quiet(s).await;
        let from_ms = unix_ms();
        let with = qd32().await?;
        let to_ms = unix_ms();
        println!("with checkpoints:    {}", with.line());
        let b = tandem_testkit::operator::channel(&lab.sites[1][0].api).await?;
        let listed = VpgServiceClient::new(b)
            .list_checkpoints(pb::ListCheckpointsQuery {
                vpg_id: VPG.into(),
                from_ms,
                to_ms,
                kind: pb::CheckpointKind::Automatic as i32,
                page_size: 1000,
                ..Default::default()
            })
            .await?
            .into_inner();
        let due = (to_ms - from_ms) / 1000 / interval_secs;
        let taken = u64::from(listed.total);
        if taken + 1 < due {
            // Why not: what the managers show and every checkpoint listed.
            let g = VpgServiceClient::new(a.clone())
                .get_vpg(pb::GetRequest { id: VPG.into() })
                .await?
                .into_inner();
            let all = VpgServiceClient::new(
                tandem_testkit::operator::channel(&lab.sites[1][0].api).await?,
            )
            .list_checkpoints(pb::ListCheckpointsQuery {
                vpg_id: VPG.into(),
                page_size: 5,
                ..Default::default()
            })
            .await?
            .into_inner();
            println!(
                "checkpoints missing: status {:?}; {} listed in all, newest {:?}",
                g.status, all.total, all.checkpoints
            );
        }
        let stall_p50 = (with.clat_p50_us - base.clat_p50_us) / 1000.0;
        let stall_p99 = (with.clat_p99_us - base.clat_p99_us) / 1000.0;
        let ok = stall_p99 <= 2.0 && taken + 1 >= due;
        println!(
            "write stall (clat with - without): p50 {stall_p50:+.2} ms p99 {stall_p99:+.2} ms; \
             {taken} checkpoints listed for {due} intervals; IOPS {:.2}x ({})",
            with.iops / base.iops.max(1e-9),
            if ok { "ok" } else { "BELOW FLOOR" }
        );
        rows.push(Row {
            bench: format!("checkpoint barrier through the managers, {HOSTS} VRAs, QD32"),
            tandem: format!(
                "stall p50 {stall_p50:+.2} ms p99 {stall_p99:+.2} ms (clat p99 {:.2} ms); \
                 {taken} checkpoints in {due} intervals",
                with.clat_p99_us / 1000.0
            ),
            yardstick: format!(
                "no checkpoints: clat p50 {:.2} ms p99 {:.2} ms",
                base.clat_p50_us / 1000.0,
                base.clat_p99_us / 1000.0
            ),
            ratio: format!("{:.2}x IOPS", with.iops / base.iops.max(1e-9)),
            floor: "stall p99 <= 2 ms; a checkpoint every interval".into(),
            met: ok,
            machine: format!("{machine}; {machine2}"),
            figure: stall_p99,
            unit: "ms stall p99",
        });
        Ok::<_, anyhow::Error>(())
    }
    .await;
    lab.down().await;
    if !s.keep {
        let _ = std::fs::remove_dir_all(&root);
    }
    r
}
