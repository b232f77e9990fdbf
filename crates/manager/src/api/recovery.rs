//! `RecoveryService`: recovery operations (today the failover test), checked on receipt.

use tandem_core::error::Violations;
use tandem_core::ids::VpgId;
use tandem_core::recovery::{CheckpointChoice, FailoverTest, TestStep, TestVerdict};
use tandem_proto::v1::{self, recovery_service_server::RecoveryService};
use tonic::{Request, Response, Status};

use super::bad;
use super::vpg::vpg_ids;
use crate::site::SiteManager;

#[derive(Debug, Clone)]
pub struct RecoveryApi(pub SiteManager);

/// The checkpoint a request names (none: the latest).
fn checkpoint_choice(v: &mut Violations, c: Option<v1::CheckpointChoice>) -> CheckpointChoice {
    use v1::checkpoint_choice::Choice;
    match c.and_then(|c| c.choice) {
        None | Some(Choice::Latest(_)) => CheckpointChoice::Latest,
        Some(Choice::LatestNamed(_)) => CheckpointChoice::LatestNamed,
        Some(Choice::Id(id)) => {
            v.check(id != 0, "checkpoint.id", "must not be 0");
            CheckpointChoice::Id(id)
        }
        Some(Choice::Name(name)) => {
            v.check(
                !name.is_empty() && name.len() <= 256,
                "checkpoint.name",
                "must be 1 to 256 bytes",
            );
            CheckpointChoice::Name(name)
        }
    }
}

fn step_name(s: TestStep) -> &'static str {
    match s {
        TestStep::Starting => "starting",
        TestStep::Running => "running",
        TestStep::Stopping => "stopping",
    }
}

fn test_to_proto(t: FailoverTest) -> v1::FailoverTest {
    v1::FailoverTest {
        vpg_id: t.vpg.to_string(),
        task_id: t.task,
        checkpoint_id: t.point.checkpoint_id,
        checkpoint_ms: t.point.timestamp_ms,
        checkpoint_name: t.point.name,
        step: step_name(t.step).into(),
        started_ms: t.started_ms,
        volumes: t
            .volumes
            .into_iter()
            .map(|v| v1::RecoveredVolume {
                nbd_uri: format!("nbd://{}/{}", v.nbd_address, v.export_name),
                vm_id: v.vm.to_string(),
                volume_id: v.volume_id,
                host_id: v.host.to_string(),
                export_name: v.export_name,
                size_bytes: v.size_bytes,
            })
            .collect(),
        error: t.error.unwrap_or_default(),
    }
}

fn tests_to_proto(tests: Vec<FailoverTest>) -> v1::FailoverTests {
    v1::FailoverTests {
        tests: tests.into_iter().map(test_to_proto).collect(),
    }
}

#[tonic::async_trait]
impl RecoveryService for RecoveryApi {
    async fn start_failover_test(
        &self,
        r: Request<v1::StartFailoverTestRequest>,
    ) -> Result<Response<v1::FailoverTests>, Status> {
        let r = r.into_inner();
        let mut v = Violations::new();
        let vpgs = vpg_ids(&mut v, &r.vpg_ids);
        let choice = checkpoint_choice(&mut v, r.checkpoint);
        v.into_result().map_err(bad)?;
        let started = self.0.start_failover_tests(vpgs, choice).await?;
        Ok(Response::new(tests_to_proto(started)))
    }

    async fn stop_failover_test(
        &self,
        r: Request<v1::StopFailoverTestRequest>,
    ) -> Result<Response<v1::Empty>, Status> {
        let r = r.into_inner();
        let mut v = Violations::new();
        let vpgs = vpg_ids(&mut v, &r.vpg_ids);
        let verdict = TestVerdict {
            passed: !r.failed,
            note: r.note,
        };
        v.absorb(verdict.validate());
        v.into_result().map_err(bad)?;
        self.0.stop_failover_tests(vpgs, verdict).await?;
        Ok(Response::new(v1::Empty {}))
    }

    async fn list_failover_tests(
        &self,
        r: Request<v1::ListFailoverTestsRequest>,
    ) -> Result<Response<v1::FailoverTests>, Status> {
        let r = r.into_inner();
        let mut v = Violations::new();
        let vpgs: Vec<VpgId> = r
            .vpg_ids
            .iter()
            .enumerate()
            .filter_map(|(i, id)| v.absorb(VpgId::parse(&format!("vpg_ids[{i}]"), id)))
            .collect();
        v.check(r.vpg_ids.len() <= 1000, "vpg_ids", "at most 1000");
        v.into_result().map_err(bad)?;
        let tests = self.0.failover_tests(vpgs).await?;
        Ok(Response::new(tests_to_proto(tests)))
    }
}
