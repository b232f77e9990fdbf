//! `tandem vm`: VMs and where they are protected.

use tandem_cli::spec;

use crate::output::{Format, bytes, print};
use anyhow::Result;
use clap::Subcommand;
use tandem_proto::client::ApiChannel as Channel;
use tandem_proto::v1;
use tandem_proto::v1::{vm_service_client::VmServiceClient, vpg_service_client::VpgServiceClient};

use crate::args::*;
use crate::vpg::*;

#[derive(Subcommand, Debug)]
pub(crate) enum VmCmd {
    /// Creates from a spec file.
    Create(FileArg),
    Get {
        id: String,
    },
    /// The VMs view: every protected VM of both sites with its VPG, direction, peer site,
    /// priority, status, state, actual RPO and operation (`--view performance`: its IO,
    /// throughput, WAN traffic, provisioned and used storage). `--inventory`: the
    /// inventory's VM records instead.
    List {
        #[arg(long, value_enum, default_value = "general")]
        view: VpgView,
        #[arg(long)]
        inventory: bool,
    },
    /// Replaces the object with the spec file's content.
    Edit {
        id: String,
        #[command(flatten)]
        file: FileArg,
    },
    Delete {
        id: String,
    },
}

pub(crate) fn vm_rows(vms: &[v1::Vm]) -> Vec<Vec<String>> {
    vms.iter()
        .map(|m| {
            let power = if m.power == v1::PowerState::On as i32 {
                "on"
            } else {
                "off"
            };
            vec![
                m.id.clone(),
                m.name.clone(),
                m.host_id.clone(),
                power.to_string(),
                m.volumes.len().to_string(),
                bytes(m.volumes.iter().map(|v| v.size_bytes).sum()),
                m.vpg_id.clone(),
            ]
        })
        .collect()
}

pub(crate) async fn run(ch: Channel, fmt: Format, c: VmCmd) -> Result<()> {
    let c = match c {
        VmCmd::List {
            view,
            inventory: false,
        } => {
            let r = VpgServiceClient::new(ch)
                .list_vpgs(v1::ListRequest {})
                .await?
                .into_inner();
            let rows = protected_vms(&r.vpgs);
            let table = rows.iter().map(|r| r.cells(view)).collect();
            print(fmt, &rows, protected_vm_head(view), table);
            return Ok(());
        }
        VmCmd::List {
            inventory: true, ..
        } => Crud::List,
        VmCmd::Create(f) => Crud::Create(f),
        VmCmd::Get { id } => Crud::Get { id },
        VmCmd::Edit { id, file } => Crud::Edit { id, file },
        VmCmd::Delete { id } => Crud::Delete { id },
    };
    let mut cl = VmServiceClient::new(ch);
    let head = [
        "ID",
        "NAME",
        "HOST",
        "POWER",
        "VOLUMES",
        "PROVISIONED",
        "VPG",
    ];
    let one = |m: v1::Vm| print(fmt, &m, &head, vm_rows(std::slice::from_ref(&m)));
    match c {
        Crud::Create(f) => {
            let m = spec::read::<spec::VmSpec>(&f.file)?.into_proto()?;
            one(cl.create_vm(m).await?.into_inner());
        }
        Crud::Get { id } => one(cl.get_vm(v1::GetRequest { id }).await?.into_inner()),
        Crud::List => {
            let r = cl.list_vms(v1::ListRequest {}).await?.into_inner();
            print(fmt, &r, &head, vm_rows(&r.vms));
        }
        Crud::Edit { id, file } => {
            let mut m = spec::read::<spec::VmSpec>(&file.file)?.into_proto()?;
            m.id = id;
            one(cl.update_vm(m).await?.into_inner());
        }
        Crud::Delete { id } => {
            cl.delete_vm(v1::DeleteRequest { id }).await?;
        }
    }
    Ok(())
}
