//! `tandem vpg`: VPGs, the seed's VPG views, and one VPG in detail.

use tandem_cli::spec;

use crate::output::{Format, bytes, print};
use anyhow::{Result, bail};
use clap::Subcommand;
use tandem_proto::client::ApiChannel as Channel;
use tandem_proto::v1;
use tandem_proto::v1::vpg_service_client::VpgServiceClient;

use crate::args::*;

#[derive(Subcommand, Debug)]
pub(crate) enum VpgCmd {
    Create(FileArg),
    Get {
        id: String,
    },
    List {
        /// Exports the list as CSV, with the columns of the VPGs view.
        #[arg(long)]
        csv: bool,
        /// Which columns: general (status, state, RPO) or performance (IO, throughput,
        /// network, provisioned and used storage).
        #[arg(long, value_enum, default_value = "general")]
        view: VpgView,
    },
    /// Refreshes the VPG list (or one VPG) every --interval seconds until interrupted.
    Watch {
        id: Option<String>,
        #[arg(long, default_value_t = 2)]
        interval: u64,
    },
    /// Replaces the definition; fails if someone else changed it since it was read.
    Edit {
        id: String,
        #[command(flatten)]
        file: FileArg,
        /// VMs the edit removes keep their recovery disks (event EV0040 names them).
        #[arg(long)]
        keep_removed_recovery_disks: bool,
    },
    Delete {
        id: String,
        /// Keep the recovery disks at the peer site for preseeding.
        #[arg(long)]
        keep_recovery_disks: bool,
        /// Force the removal of a VPG waiting to be removed.
        #[arg(long)]
        force: bool,
    },
    /// Pauses protection: writes are tracked, nothing crosses the WAN; the VPGs stay
    /// recoverable to their last checkpoint before the pause (add one first if needed).
    Pause {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Resumes paused VPGs: a bitmap sync sends what was written meanwhile.
    Resume {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Starts a delta sync of every volume of the VPGs.
    ForceSync {
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum VpgView {
    General,
    Performance,
}

/// One row of the VMs view: a VM of a VPG, its VPG's status and its own figures.
#[derive(Debug, serde::Serialize)]
pub(crate) struct ProtectedVmRow {
    pub(crate) vm_id: String,
    pub(crate) vm_name: String,
    pub(crate) vpg_id: String,
    pub(crate) vpg_name: String,
    pub(crate) direction: String,
    pub(crate) peer_site: String,
    pub(crate) priority: String,
    pub(crate) alert: String,
    pub(crate) status: String,
    pub(crate) state: String,
    pub(crate) sync_percent: Option<u32>,
    pub(crate) actual_rpo_secs: Option<u64>,
    pub(crate) operation: String,
    pub(crate) write_iops: u64,
    pub(crate) write_bytes_per_sec: u64,
    pub(crate) wan_bytes_per_sec: u64,
    pub(crate) provisioned_bytes: u64,
    pub(crate) used_bytes: u64,
}

impl ProtectedVmRow {
    pub(crate) fn cells(&self, view: VpgView) -> Vec<String> {
        match view {
            VpgView::General => vec![
                self.vm_name.clone(),
                self.vpg_name.clone(),
                self.direction.clone(),
                self.peer_site.clone(),
                self.priority.clone(),
                self.alert.clone(),
                match self.sync_percent {
                    Some(p) => format!("{} {p}%", self.status),
                    None => self.status.clone(),
                },
                self.state.clone(),
                self.actual_rpo_secs.map_or("-".into(), |r| format!("{r}s")),
                self.operation.clone(),
            ],
            VpgView::Performance => vec![
                self.vm_name.clone(),
                self.vpg_name.clone(),
                self.write_iops.to_string(),
                format!("{}/s", bytes(self.write_bytes_per_sec)),
                format!("{}/s", bytes(self.wan_bytes_per_sec)),
                bytes(self.provisioned_bytes),
                bytes(self.used_bytes),
            ],
        }
    }
}

/// The VMs view's rows: every VM of every VPG listed, with its figures.
pub(crate) fn protected_vms(vpgs: &[v1::Vpg]) -> Vec<ProtectedVmRow> {
    let mut rows = Vec::new();
    for g in vpgs {
        let st = g.status.clone().unwrap_or_default();
        for vm in &g.vms {
            let id = vm
                .placement
                .as_ref()
                .map(|p| p.vm_id.clone())
                .unwrap_or_default();
            let figures = st.vms.iter().find(|f| f.vm_id == id);
            rows.push(ProtectedVmRow {
                vm_name: vm.vm_name.clone(),
                vm_id: id,
                vpg_id: g.id.clone(),
                vpg_name: g.name.clone(),
                direction: g.direction.clone(),
                peer_site: g.peer_site_name.clone(),
                priority: priority_name(g.settings.as_ref().map_or(0, |s| s.priority)).into(),
                alert: st.alert.clone(),
                status: st.status.clone(),
                state: state_cell(&st),
                sync_percent: (!st.sync.is_empty()).then_some(st.sync_percent),
                actual_rpo_secs: st.actual_rpo_secs,
                operation: st.operation.clone(),
                write_iops: figures.map_or(0, |f| f.write_iops),
                write_bytes_per_sec: figures.map_or(0, |f| f.write_bytes_per_sec),
                wan_bytes_per_sec: figures.map_or(0, |f| f.wan_bytes_per_sec),
                provisioned_bytes: figures.map_or(vm.provisioned_bytes, |f| f.provisioned_bytes),
                used_bytes: figures.map_or(0, |f| f.used_bytes),
            });
        }
    }
    rows
}

pub(crate) fn protected_vm_head(view: VpgView) -> &'static [&'static str] {
    match view {
        VpgView::General => &[
            "VM",
            "VPG",
            "DIRECTION",
            "PEER SITE",
            "PRIORITY",
            "ALERT",
            "PROTECTION STATUS",
            "STATE",
            "ACTUAL RPO",
            "OPERATION",
        ],
        VpgView::Performance => &[
            "VM",
            "VPG",
            "IO",
            "THROUGHPUT",
            "NETWORK",
            "PROVISIONED",
            "USED",
        ],
    }
}

/// The state column: the substatus, with a sync's progress, time left and trigger.
pub(crate) fn state_cell(st: &v1::VpgStatus) -> String {
    let mut s = st.substatus.clone();
    if !st.sync.is_empty() {
        s.push_str(&format!(" {}%", st.sync_percent));
        if st.sync_eta_secs > 0 {
            s.push_str(&format!(" ({}s left)", st.sync_eta_secs));
        }
        if !st.sync_trigger.is_empty() {
            s.push_str(&format!(" [{}]", st.sync_trigger));
        }
    }
    s
}

pub(crate) fn priority_name(p: i32) -> &'static str {
    match v1::Priority::try_from(p) {
        Ok(v1::Priority::Low) => "Low",
        Ok(v1::Priority::High) => "High",
        _ => "Medium",
    }
}

pub(crate) fn vpg_rows(vpgs: &[v1::Vpg], view: VpgView) -> Vec<Vec<String>> {
    vpgs.iter()
        .map(|g| {
            let st = g.status.clone().unwrap_or_default();
            let name = format!("{} ({})", g.name, g.vms.len());
            match view {
                VpgView::General => vec![
                    g.id.clone(),
                    name,
                    g.direction.clone(),
                    g.peer_site_name.clone(),
                    priority_name(g.settings.as_ref().map_or(0, |s| s.priority)).into(),
                    st.alert.clone(),
                    st.status.clone(),
                    state_cell(&st),
                    st.actual_rpo_secs.map_or("-".into(), |r| format!("{r}s")),
                    st.operation.clone(),
                ],
                VpgView::Performance => vec![
                    g.id.clone(),
                    name,
                    st.write_iops.to_string(),
                    format!("{}/s", bytes(st.write_bytes_per_sec)),
                    format!("{}/s", bytes(st.wan_bytes_per_sec)),
                    bytes(st.provisioned_bytes),
                    bytes(st.used_bytes),
                ],
            }
        })
        .collect()
}

pub(crate) fn vpg_head(view: VpgView) -> &'static [&'static str] {
    match view {
        VpgView::General => &[
            "ID",
            "NAME (#VMS)",
            "DIRECTION",
            "PEER SITE",
            "PRIORITY",
            "ALERT",
            "STATUS",
            "STATE",
            "ACTUAL RPO",
            "OPERATION",
        ],
        VpgView::Performance => &[
            "ID",
            "NAME (#VMS)",
            "IO",
            "THROUGHPUT",
            "NETWORK",
            "PROVISIONED",
            "USED",
        ],
    }
}

/// One VPG in detail: the list row, then its figures and what is wrong.
pub(crate) fn vpg_detail(fmt: Format, g: &v1::Vpg) {
    print(
        fmt,
        g,
        vpg_head(VpgView::General),
        vpg_rows(std::slice::from_ref(g), VpgView::General),
    );
    if fmt != Format::Table {
        return;
    }
    let st = g.status.clone().unwrap_or_default();
    println!(
        "IO {}/s  throughput {}/s  network {}/s  provisioned {}  used {}",
        st.write_iops,
        bytes(st.write_bytes_per_sec),
        bytes(st.wan_bytes_per_sec),
        bytes(st.provisioned_bytes),
        bytes(st.used_bytes)
    );
    println!(
        "history {}s held of {}s configured; last checkpoint {}",
        st.history_held_secs,
        st.history_configured_secs,
        if st.last_checkpoint_id == 0 {
            "none".to_string()
        } else {
            format!("{} at {} ms", st.last_checkpoint_id, st.last_checkpoint_ms)
        }
    );
    if !st.sync.is_empty() {
        let width = 40;
        let done = (st.sync_percent.min(100) as usize) * width / 100;
        println!(
            "{} [{}{}] {}%",
            st.sync,
            "#".repeat(done),
            "-".repeat(width - done),
            st.sync_percent
        );
    }
    if !g.owner_site_id.is_empty() {
        println!("VMs run at site {}", g.owner_site_id);
    }
    if let Some(d) = &g.stood_down {
        println!("stood down here: {}", d.what);
        if !d.counted {
            println!("divergence: being counted");
        }
        for v in &d.divergence {
            println!(
                "divergent: host {} VM {} volume {}: {}",
                v.host_id,
                v.vm_id,
                v.volume_id,
                if v.known {
                    bytes(v.bytes)
                } else {
                    "unknown".to_string()
                }
            );
        }
    }
    for p in &st.problems {
        println!("problem: {p}");
    }
}

pub(crate) async fn run(ch: Channel, fmt: Format, c: VpgCmd) -> Result<()> {
    let mut cl = VpgServiceClient::new(ch);
    let one = |g: v1::Vpg| vpg_detail(fmt, &g);
    match c {
        VpgCmd::Create(f) => {
            let (id, spec) = spec::read::<spec::VpgSpecFile>(&f.file)?.into_proto()?;
            let req = v1::CreateVpgRequest {
                id,
                spec: Some(spec),
            };
            one(cl.create_vpg(req).await?.into_inner());
        }
        VpgCmd::Get { id } => one(cl.get_vpg(v1::GetRequest { id }).await?.into_inner()),
        VpgCmd::List { csv: true, .. } => {
            let r = cl.export_vpgs_csv(v1::ListRequest {}).await?.into_inner();
            print!("{}", r.csv);
        }
        VpgCmd::List { csv: false, view } => {
            let r = cl.list_vpgs(v1::ListRequest {}).await?.into_inner();
            print(fmt, &r, vpg_head(view), vpg_rows(&r.vpgs, view));
        }
        VpgCmd::Watch { id, interval } => loop {
            // Clear the screen and home the cursor, as watch(1) does.
            print!("\x1b[2J\x1b[H");
            match &id {
                Some(id) => one(cl
                    .get_vpg(v1::GetRequest { id: id.clone() })
                    .await?
                    .into_inner()),
                None => {
                    let r = cl.list_vpgs(v1::ListRequest {}).await?.into_inner();
                    print(
                        fmt,
                        &r,
                        vpg_head(VpgView::General),
                        vpg_rows(&r.vpgs, VpgView::General),
                    );
                }
            }
            tokio::time::sleep(std::time::Duration::from_secs(interval.max(1))).await;
        },
        VpgCmd::Edit {
            id,
            file,
            keep_removed_recovery_disks,
        } => {
            let current = cl
                .get_vpg(v1::GetRequest { id: id.clone() })
                .await?
                .into_inner();
            let (file_id, spec) = spec::read::<spec::VpgSpecFile>(&file.file)?.into_proto()?;
            if !file_id.is_empty() && file_id != id {
                bail!("the spec file is for VPG {file_id}, not {id}");
            }
            let req = v1::UpdateVpgRequest {
                id,
                generation: current.generation,
                spec: Some(spec),
                keep_removed_recovery_disks,
            };
            one(cl.update_vpg(req).await?.into_inner());
        }
        VpgCmd::Delete {
            id,
            keep_recovery_disks,
            force,
        } => {
            cl.delete_vpg(v1::DeleteVpgRequest {
                id,
                keep_recovery_disks,
                force,
            })
            .await?;
        }
        VpgCmd::Pause { ids } => {
            cl.pause_vpgs(v1::VpgIdsRequest { vpg_ids: ids }).await?;
        }
        VpgCmd::Resume { ids } => {
            cl.resume_vpgs(v1::VpgIdsRequest { vpg_ids: ids }).await?;
        }
        VpgCmd::ForceSync { ids } => {
            cl.force_sync_vpgs(v1::VpgIdsRequest { vpg_ids: ids })
                .await?;
        }
    }
    Ok(())
}
