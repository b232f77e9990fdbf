//! `RecoveryService`: recovery operations (failover tests, failovers), checked on receipt.

use tandem_core::error::Violations;
use tandem_core::ids::VpgId;
use tandem_core::recovery::{
    CheckpointChoice, CommitPolicy, FailoverTest, MAX_COMMIT_POLICY_SECS, RecoveryIntent,
    RecoveryOp, Shutdown, TestStep, TestVerdict, TestVolume,
};
use tandem_proto::v1::{self, recovery_service_server::RecoveryService};
use tonic::{Request, Response, Status};

use super::bad;
use super::vpg::vpg_ids;
use crate::error::ApiError;
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

fn volumes_to_proto(volumes: Vec<TestVolume>) -> Vec<v1::RecoveredVolume> {
    volumes
        .into_iter()
        .map(|v| v1::RecoveredVolume {
            nbd_uri: if v.nbd_socket.is_empty() {
                format!("nbd://{}/{}", v.nbd_address, v.export_name)
            } else {
                format!("nbd+unix:///{}?socket={}", v.export_name, v.nbd_socket)
            },
            nbds_uri: format!("nbds://{}/{}", v.nbd_address, v.export_name),
            vm_id: v.vm.to_string(),
            volume_id: v.volume_id,
            host_id: v.host.to_string(),
            export_name: v.export_name,
            size_bytes: v.size_bytes,
        })
        .collect()
}

fn policy_name(p: CommitPolicy) -> String {
    match p {
        CommitPolicy::Manual => "manual".into(),
        CommitPolicy::AutoCommit { after_secs } => format!("auto-commit after {after_secs} s"),
        CommitPolicy::AutoRollback { after_secs } => {
            format!("auto-rollback after {after_secs} s")
        }
    }
}

fn op_to_proto(op: RecoveryOp) -> v1::RecoveryOperation {
    v1::RecoveryOperation {
        op_id: op.id.to_string(),
        vpg_id: op.vpg.to_string(),
        kind: op.kind.name().into(),
        step: op.step.name().into(),
        checkpoint_id: op.point.checkpoint_id,
        checkpoint_ms: op.point.timestamp_ms,
        checkpoint_name: op.point.name,
        task_id: op.task,
        error: op.error.unwrap_or_default(),
        started_ms: op.started_ms,
        step_since_ms: op.step_since_ms,
        volumes: volumes_to_proto(op.volumes),
        intent: match op.intent {
            None => String::new(),
            Some(RecoveryIntent::Commit) => "commit".into(),
            Some(RecoveryIntent::Rollback) => "rollback".into(),
        },
        new_generation: op.new_generation.unwrap_or_default(),
        commit_policy: policy_name(op.policy),
    }
}

fn commit_policy(v: &mut Violations, kind: i32, after_secs: u64) -> CommitPolicy {
    use v1::CommitPolicyKind as K;
    let mut timed = || {
        v.check(
            (1..=MAX_COMMIT_POLICY_SECS).contains(&after_secs),
            "commit_after_secs",
            format!("must be 1 to {MAX_COMMIT_POLICY_SECS} with an automatic policy"),
        );
        after_secs
    };
    match K::try_from(kind) {
        Ok(K::Manual) => CommitPolicy::Manual,
        Ok(K::AutoCommit) => CommitPolicy::AutoCommit {
            after_secs: timed(),
        },
        Ok(K::AutoRollback) => CommitPolicy::AutoRollback {
            after_secs: timed(),
        },
        Err(_) => {
            v.add("commit_policy", "unknown policy");
            CommitPolicy::Manual
        }
    }
}

fn one_vpg(r: &str) -> Result<VpgId, Status> {
    VpgId::parse("vpg_id", r).map_err(bad)
}

/// The VPGs a listing names (none: all).
fn listed_vpgs(ids: &[String]) -> Result<Vec<VpgId>, Status> {
    let mut v = Violations::new();
    let vpgs = ids
        .iter()
        .enumerate()
        .filter_map(|(i, id)| v.absorb(VpgId::parse(&format!("vpg_ids[{i}]"), id)))
        .collect();
    v.check(ids.len() <= 1000, "vpg_ids", "at most 1000");
    v.into_result().map_err(bad)?;
    Ok(vpgs)
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
        volumes: volumes_to_proto(t.volumes),
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
        let vpgs = listed_vpgs(&r.into_inner().vpg_ids)?;
        let tests = self.0.failover_tests(vpgs).await?;
        Ok(Response::new(tests_to_proto(tests)))
    }

    async fn start_failover(
        &self,
        r: Request<v1::StartFailoverRequest>,
    ) -> Result<Response<v1::RecoveryOperation>, Status> {
        let r = r.into_inner();
        let mut v = Violations::new();
        let vpg = v.absorb(VpgId::parse("vpg_id", &r.vpg_id));
        let choice = checkpoint_choice(&mut v, r.checkpoint);
        let policy = commit_policy(&mut v, r.commit_policy, r.commit_after_secs);
        let shutdown = match v1::ShutdownVms::try_from(r.shutdown) {
            Ok(v1::ShutdownVms::No) => Shutdown::No,
            Ok(v1::ShutdownVms::Yes) => Shutdown::Yes,
            Ok(v1::ShutdownVms::Force) => Shutdown::Force,
            Err(_) => {
                v.add("shutdown", "unknown value");
                Shutdown::No
            }
        };
        let reverse = reverse_choice(&mut v, r.reverse);
        v.into_result().map_err(bad)?;
        let vpg = vpg.ok_or_else(|| ApiError::invalid("vpg_id"))?;
        let op = self
            .0
            .start_failover(vpg, choice, policy, shutdown, reverse)
            .await?;
        Ok(Response::new(op_to_proto(op)))
    }

    async fn start_move(
        &self,
        r: Request<v1::StartMoveRequest>,
    ) -> Result<Response<v1::RecoveryOperation>, Status> {
        let r = r.into_inner();
        let mut v = Violations::new();
        let vpg = v.absorb(VpgId::parse("vpg_id", &r.vpg_id));
        let policy = commit_policy(&mut v, r.commit_policy, r.commit_after_secs);
        let reverse = reverse_choice(&mut v, r.reverse);
        v.into_result().map_err(bad)?;
        let vpg = vpg.ok_or_else(|| ApiError::invalid("vpg_id"))?;
        let op = self.0.start_move(vpg, policy, reverse).await?;
        Ok(Response::new(op_to_proto(op)))
    }

    async fn commit_recovery(
        &self,
        r: Request<v1::RecoveryRef>,
    ) -> Result<Response<v1::RecoveryOperation>, Status> {
        let vpg = one_vpg(&r.into_inner().vpg_id)?;
        let op = self.0.recovery_input(vpg, RecoveryIntent::Commit).await?;
        Ok(Response::new(op_to_proto(op)))
    }

    async fn rollback_recovery(
        &self,
        r: Request<v1::RecoveryRef>,
    ) -> Result<Response<v1::RecoveryOperation>, Status> {
        let vpg = one_vpg(&r.into_inner().vpg_id)?;
        let op = self.0.recovery_input(vpg, RecoveryIntent::Rollback).await?;
        Ok(Response::new(op_to_proto(op)))
    }

    async fn protect_back(
        &self,
        r: Request<v1::ProtectBackRequest>,
    ) -> Result<Response<v1::Vpg>, Status> {
        let r = r.into_inner();
        let vpg = one_vpg(&r.vpg_id)?;
        let pool = if r.reverse_pool_id.is_empty() {
            None
        } else {
            Some(
                tandem_core::ids::PoolId::parse("reverse_pool_id", &r.reverse_pool_id)
                    .map_err(bad)?,
            )
        };
        let view = self.0.protect_back(vpg, pool).await?;
        Ok(Response::new(super::vpg::view_to_proto(&view)))
    }

    async fn list_recoveries(
        &self,
        r: Request<v1::ListRecoveriesRequest>,
    ) -> Result<Response<v1::RecoveryOperations>, Status> {
        let vpgs = listed_vpgs(&r.into_inner().vpg_ids)?;
        let ops = self.0.recoveries(vpgs).await?;
        Ok(Response::new(v1::RecoveryOperations {
            operations: ops.into_iter().map(op_to_proto).collect(),
        }))
    }
}

/// Whether a failover or move protects the VMs back on commit; `None`: the default.
fn reverse_choice(v: &mut Violations, raw: i32) -> Option<bool> {
    match v1::ReverseProtection::try_from(raw) {
        Ok(v1::ReverseProtection::Default) => None,
        Ok(v1::ReverseProtection::Yes) => Some(true),
        Ok(v1::ReverseProtection::No) => Some(false),
        Err(_) => {
            v.add("reverse", "unknown value");
            None
        }
    }
}
