//! From VRA reports and peer reports to the seed's statuses and figures, case by case.

use super::*;
use crate::ids::{DatastoreId, PoolId, VmId};
use crate::status::{AlertColor, Operation, VpgStatus, VpgSubstatus};
use crate::vpg::{VmFootprint, VmPlacement, VpgSettings, VpgVm};

fn vpg(operation: Option<Operation>) -> Vpg {
    Vpg {
        reversed_at: 0,
        id: VpgId::minted("g".into()),
        name: "g".into(),
        generation: 2,
        protected_site: SiteId::minted("a".into()),
        recovery_site: SiteId::minted("b".into()),
        settings: VpgSettings::default(),
        vms: vec![VpgVm {
            source: None,
            placement: VmPlacement {
                disk_paths: Default::default(),
                vm_id: VmId::minted("vm".into()),
                recovery_host: HostId::minted("r1".into()),
                recovery_datastore: DatastoreId::minted("ds".into()),
                recovery_pool: PoolId::minted("p".into()),
                preseeded: false,
            },
            footprint: VmFootprint {
                cpus: 1,
                vm_name: "vm".into(),
                cpu_reservation_mhz: 0,
                memory_reservation_mib: 0,
                memory_mib: 4096,
                volumes: vec![(0, 0, 1 << 30)],
                journal_hard_limit: crate::vpg::JournalLimit::Unlimited,
                journal_warning: crate::vpg::JournalLimit::Unlimited,
            },
        }],
        created_at_ms: 0,
        updated_at_ms: 0,
        operation,
        paused: false,
        keep_recovery_disks: false,
        delete_started_ms: 0,
        keep_removed_recovery_disks: false,
        kept_recovery_vms: Default::default(),
        manager_paused_until_ms: 0,
    }
}

fn protected() -> VraVpgReport {
    VraVpgReport {
        role: Role::Protected,
        generation: 2,
        state: StreamState::Replicating,
        sync: None,
        tracking: false,
        paused: false,
        acked_seq: 10,
        write_iops: 100,
        write_bytes_per_sec: 1 << 20,
        wan_bytes_per_sec: 1 << 19,
        journal_bytes: 0,
        last_durable_checkpoint: None,
        oldest_checkpoint_ms: None,
        history_short: false,
        storage_error: None,
        journal_error: None,
        last_error: String::new(),
        vm_rates: vec![VmRates {
            vm: VmId::minted("vm".into()),
            write_iops: 100,
            write_bytes_per_sec: 1 << 20,
            wan_bytes_per_sec: 1 << 19,
        }],
        vm_journal_bytes: vec![],
        divergent: vec![],
        divergence_known: false,
    }
}

fn recovery(cp_ms: u64) -> VraVpgReport {
    VraVpgReport {
        role: Role::Recovery,
        journal_bytes: 5 << 20,
        vm_rates: vec![],
        vm_journal_bytes: vec![(VmId::minted("vm".into()), 5 << 20)],
        last_durable_checkpoint: Some((7, cp_ms)),
        oldest_checkpoint_ms: Some(cp_ms - 60_000),
        write_iops: 0,
        write_bytes_per_sec: 0,
        wan_bytes_per_sec: 0,
        ..protected()
    }
}

fn seen(host: &str, r: VraVpgReport) -> HostSeen {
    HostSeen {
        host: HostId::minted(host.into()),
        seen: VraSeen::Reported(Box::new(r)),
    }
}

fn peer(vras: Vec<HostSeen>) -> PeerVpgReport {
    PeerVpgReport {
        vpg: VpgId::minted("g".into()),
        generation: 2,
        assigned_generation: 2,
        vras,
        targets: vec![],
        plan_error: None,
        manager_paused: false,
        recovery: None,
    }
}

const NOW: u64 = 1_000_000;

fn run(g: &Vpg, protects: bool, own: &[HostSeen], peer: Option<&PeerVpgReport>) -> LiveStatus {
    evaluate(&LiveInputs {
        vpg: g,
        protects,
        now_ms: NOW,
        own,
        peer,
        plan_error: None,
        coordinated_checkpoint: None,
        test_overdue: false,
        stood_down: None,
    })
}

fn shown(s: &LiveStatus) -> (VpgStatus, VpgSubstatus, AlertColor) {
    (s.state.status, s.state.substatus, s.state.alert)
}

#[test]
fn replicating_with_a_recent_checkpoint_meets_sla_with_figures() {
    let g = vpg(None);
    let own = [seen("p1", protected())];
    let p = peer(vec![seen("r1", recovery(NOW - 3000))]);
    let s = run(&g, true, &own, Some(&p));
    assert_eq!(
        shown(&s),
        (VpgStatus::MeetingSla, VpgSubstatus::None, AlertColor::Green)
    );
    assert!(s.level);
    assert_eq!(s.figures.actual_rpo_secs, Some(3));
    assert_eq!(s.figures.write_iops, 100);
    assert_eq!(s.figures.provisioned_bytes, (1 << 30) + (4096 << 20));
    assert_eq!(s.figures.used_bytes, (1 << 30) + (5 << 20));
    // The VM's own figures (the VMs tab): its rates from the protected VRA, its disks
    // and memory, its recovery disks and journal.
    let vm = &s.figures.vms[0];
    assert_eq!(vm.vm.as_str(), "vm");
    assert_eq!(
        (vm.write_iops, vm.write_bytes_per_sec, vm.wan_bytes_per_sec),
        (100, 1 << 20, 1 << 19)
    );
    assert_eq!(vm.provisioned_bytes, (1 << 30) + (4096 << 20));
    assert_eq!(vm.used_bytes, (1 << 30) + (5 << 20));
    assert_eq!(s.figures.history_held_secs, 63);
    // The recovery site sees the same VPG the same way from its side.
    let own = [seen("r1", recovery(NOW - 3000))];
    let p = peer(vec![seen("p1", protected())]);
    assert_eq!(
        shown(&run(&g, false, &own, Some(&p))).0,
        VpgStatus::MeetingSla
    );
}

#[test]
fn a_turned_vpg_needs_configuration_until_the_old_site_takes_it_then_a_cut_is_a_cut() {
    let mut g = vpg(None);
    g.reversed_at = g.generation;
    let own = [seen("p1", protected())];
    let needs = (
        VpgStatus::NotMeetingSla,
        VpgSubstatus::NeedsConfiguration,
        AlertColor::Red,
    );
    assert_eq!(shown(&run(&g, true, &own, None)), needs);
    let mut behind = peer(vec![seen("r1", recovery(NOW - 3000))]);
    behind.generation = g.generation - 1;
    assert_eq!(shown(&run(&g, true, &own, Some(&behind))), needs);
    // Taken: both sites store a generation above the turn's; a later cut is a cut.
    g.generation += 1;
    let cut = shown(&run(&g, true, &own, None)).1;
    assert!(
        matches!(
            cut,
            VpgSubstatus::SiteDisconnection | VpgSubstatus::SiteDisconnectionNoCheckpoints
        ),
        "{cut:?}"
    );
}

#[test]
fn a_sync_into_a_full_journal_pauses_once_for_the_replication_pause_time() {
    let mut g = vpg(None);
    g.settings.replication_pause_secs = 30;
    let mut a = protected();
    a.sync = Some(SyncProgress {
        kind: SyncKind::Delta,
        trigger: Some(SyncTrigger::ForceSync),
        percent: 10,
        eta_secs: 30,
        total_bytes: 100,
        done_bytes: 10,
    });
    let own = [seen("p1", a)];
    let mut full = recovery(NOW - 3000);
    full.history_short = true;
    let p = peer(vec![seen("r1", full)]);
    let st = run(&g, true, &own, Some(&p));
    assert!(st.figures.history_held_secs < SYNC_MIN_HISTORY_SECS);
    let until_ms = NOW + 30_000;
    assert_eq!(
        sync_pause(&g, &st, false, NOW),
        SyncPause::Pause { until_ms }
    );
    // Once per sync; never without a pause time, or for an initial sync.
    assert_eq!(sync_pause(&g, &st, true, NOW), SyncPause::Nothing);
    let mut no_time = g.clone();
    no_time.settings.replication_pause_secs = 0;
    assert_eq!(sync_pause(&no_time, &st, false, NOW), SyncPause::Nothing);
    let mut initial = st.clone();
    initial.observation.sync = Some(SyncKind::Initial);
    assert_eq!(sync_pause(&g, &initial, false, NOW), SyncPause::Nothing);
    // A journal with room, or with ten minutes of checkpoints left, goes on syncing.
    let p_room = peer(vec![seen("r1", recovery(NOW - 3000))]);
    let room = run(&g, true, &own, Some(&p_room));
    assert_eq!(sync_pause(&g, &room, false, NOW), SyncPause::Nothing);

    // Paused: shown as the site manager's pause, on both sides, until the time is over.
    g.manager_paused_until_ms = until_ms;
    let mut held = protected();
    held.paused = true;
    held.tracking = true;
    let own = [seen("p1", held.clone())];
    let st = run(&g, true, &own, Some(&p));
    assert_eq!(st.state.substatus, VpgSubstatus::ManagerPausedProtection);
    assert_eq!(sync_pause(&g, &st, true, NOW), SyncPause::Nothing);
    assert_eq!(sync_pause(&g, &st, true, until_ms), SyncPause::End);
    let mut from_protected = peer(vec![seen("p1", held)]);
    from_protected.manager_paused = true;
    let at_recovery = run(
        &g,
        false,
        &[seen("r1", recovery(NOW))],
        Some(&from_protected),
    );
    assert_eq!(
        at_recovery.state.substatus,
        VpgSubstatus::ManagerPausedProtection
    );
    // The operator's pause is the operator's, and ends the manager's.
    g.paused = true;
    let st = run(&g, true, &own, Some(&p));
    assert_eq!(st.state.substatus, VpgSubstatus::UserPausedProtection);
    assert_eq!(sync_pause(&g, &st, true, NOW), SyncPause::End);
}

#[test]
fn initial_sync_shows_progress_while_creating() {
    let g = vpg(Some(Operation::Creating));
    let mut a = protected();
    a.sync = Some(SyncProgress {
        kind: SyncKind::Initial,
        trigger: None,
        percent: 10,
        eta_secs: 30,
        total_bytes: 100,
        done_bytes: 10,
    });
    let mut b = a.clone();
    b.sync.as_mut().unwrap().done_bytes = 50;
    let own = [seen("p1", a), seen("p2", b)];
    let p = peer(vec![seen(
        "r1",
        VraVpgReport {
            last_durable_checkpoint: None,
            ..recovery(NOW)
        },
    )]);
    let s = run(&g, true, &own, Some(&p));
    assert_eq!(
        shown(&s),
        (
            VpgStatus::Initializing,
            VpgSubstatus::InitialSync,
            AlertColor::Green
        )
    );
    let sync = s.figures.sync.unwrap();
    assert_eq!(
        (sync.percent, sync.eta_secs, sync.total_bytes),
        (30, 30, 200)
    );
    assert!(!s.level);
    assert_eq!(s.figures.actual_rpo_secs, None);
}

#[test]
fn peer_out_of_reach_is_site_disconnection_or_recovery_is_possible() {
    let g = vpg(None);
    let own = [seen("p1", protected())];
    let s = run(&g, true, &own, None);
    assert_eq!(
        s.state.substatus,
        VpgSubstatus::SiteDisconnectionNoCheckpoints
    );
    let s = evaluate(&LiveInputs {
        coordinated_checkpoint: Some((3, NOW - 1000)),
        ..LiveInputs {
            vpg: &g,
            protects: true,
            now_ms: NOW,
            own: &own,
            peer: None,
            plan_error: None,
            coordinated_checkpoint: None,
            test_overdue: false,
            stood_down: None,
        }
    });
    assert_eq!(
        shown(&s),
        (
            VpgStatus::NotMeetingSla,
            VpgSubstatus::SiteDisconnection,
            AlertColor::Red
        )
    );
    let own = [seen("r1", recovery(NOW - 1000))];
    let s = run(&g, false, &own, None);
    assert_eq!(s.state.substatus, VpgSubstatus::RecoveryIsPossible);
}

#[test]
fn vra_faults_map_to_the_seed_substatuses() {
    let g = vpg(None);
    let own = [HostSeen {
        host: HostId::minted("p1".into()),
        seen: VraSeen::Unreachable("connection refused".into()),
    }];
    let p = peer(vec![seen("r1", recovery(NOW))]);
    let s = run(&g, true, &own, Some(&p));
    assert_eq!(s.state.substatus, VpgSubstatus::Error);
    assert!(s.figures.problems[0].contains("connection refused"));
    let own = [HostSeen {
        host: HostId::minted("p1".into()),
        seen: VraSeen::NotAssigned,
    }];
    assert_eq!(
        run(&g, true, &own, Some(&p)).state.substatus,
        VpgSubstatus::VmNotProtected
    );
    // The recovery site cannot find the datastore the VPG names: both sites show it.
    let mut missing = peer(vec![]);
    missing.plan_error = Some(PlanError::of_plan(&crate::DomainError::not_found(
        crate::ids::DatastoreId::KIND,
        "ds-9",
    )));
    let own = [seen("p1", protected())];
    let s = run(&g, true, &own, Some(&missing));
    assert_eq!(s.state.substatus, VpgSubstatus::RecoveryStorageProfileError);
    assert!(s.figures.problems[0].starts_with("recovery site: "));
    let s = evaluate(&LiveInputs {
        vpg: &g,
        protects: false,
        now_ms: NOW,
        own: &[],
        peer: Some(&peer(vec![seen("p1", protected())])),
        plan_error: missing.plan_error.as_ref(),
        coordinated_checkpoint: None,
        test_overdue: false,
        stood_down: None,
    });
    assert_eq!(s.state.substatus, VpgSubstatus::RecoveryStorageProfileError);
    let host_gone = PlanError::of_plan(&crate::DomainError::not_found("host", "h9"));
    assert_eq!(host_gone.kind, PlanErrorKind::NotProtected);
    let full = VraVpgReport {
        storage_error: Some("no space left on device".into()),
        state: StreamState::Failed,
        ..recovery(NOW)
    };
    let p = peer(vec![seen("r1", full.clone())]);
    assert_eq!(
        run(&g, true, &own, Some(&p)).state.substatus,
        VpgSubstatus::RecoveryStorageError
    );
    // A journal's I/O error is shown as such at both sites, ahead of the storage error
    // the protected VRA hears of on its stream.
    let broken = VraVpgReport {
        storage_error: None,
        journal_error: Some("journal of vm a failed: Input/output error".into()),
        ..full
    };
    let mut hearing = protected();
    hearing.last_error = "journal storage error".into();
    hearing.sync = Some(SyncProgress {
        kind: SyncKind::Bitmap,
        trigger: Some(SyncTrigger::RecoveryOrJournalStorageError),
        percent: 0,
        eta_secs: 0,
        total_bytes: 0,
        done_bytes: 0,
    });
    let p = peer(vec![seen("r1", broken.clone())]);
    let s = run(&g, true, &[seen("p1", hearing)], Some(&p));
    assert_eq!(s.state.substatus, VpgSubstatus::JournalStorageError);
    assert!(
        s.figures
            .problems
            .iter()
            .any(|p| p.contains("Input/output error"))
    );
    let p = peer(vec![seen("p1", protected())]);
    assert_eq!(
        run(&g, false, &[seen("r1", broken)], Some(&p))
            .state
            .substatus,
        VpgSubstatus::JournalStorageError
    );
    let mut paused = protected();
    paused.paused = true;
    let p = peer(vec![seen("r1", recovery(NOW))]);
    assert_eq!(
        run(&g, true, &[seen("p1", paused)], Some(&p))
            .state
            .substatus,
        VpgSubstatus::UserPausedProtection
    );
}

#[test]
fn sla_figures_decide_the_status_while_replicating() {
    let g = vpg(None);
    let own = [seen("p1", protected())];
    let p = peer(vec![seen("r1", recovery(NOW - 400_000))]);
    assert_eq!(
        run(&g, true, &own, Some(&p)).state.status,
        VpgStatus::RpoNotMeetingSla
    );
    let short = VraVpgReport {
        history_short: true,
        ..recovery(NOW - 1000)
    };
    let p = peer(vec![seen("r1", short)]);
    assert_eq!(
        run(&g, true, &own, Some(&p)).state.status,
        VpgStatus::HistoryNotMeetingSla
    );
    // The oldest of the recovery VRAs' newest checkpoints is the VPG's.
    let p = peer(vec![
        seen("r1", recovery(NOW - 1000)),
        seen("r2", recovery(NOW - 9000)),
    ]);
    assert_eq!(
        run(&g, true, &own, Some(&p)).figures.actual_rpo_secs,
        Some(9)
    );
    let mut bitmap = protected();
    bitmap.sync = Some(SyncProgress {
        kind: SyncKind::Bitmap,
        trigger: Some(SyncTrigger::RecoveryVraCommunicationProblem),
        percent: 0,
        eta_secs: 0,
        total_bytes: 0,
        done_bytes: 0,
    });
    let p = peer(vec![seen("r1", recovery(NOW - 1000))]);
    let s = run(&g, true, &[seen("p1", bitmap)], Some(&p));
    assert_eq!(s.state.substatus, VpgSubstatus::BitmapSyncing);
    assert_eq!(
        s.figures.sync.unwrap().trigger,
        Some(SyncTrigger::RecoveryVraCommunicationProblem)
    );
}

#[test]
fn a_stood_down_vpg_shows_the_peers_operation_then_needs_configuration_never_green() {
    use crate::fence::{ClaimPhase, RecoveryClaim, StandDown, StandDownCause};
    use crate::recovery::{RecoveryKind, RecoveryPoint};
    let g = vpg(None);
    let claim = |phase, reverse| RecoveryClaim {
        op: crate::ids::RecoveryOpId::minted("op".into()),
        kind: RecoveryKind::Failover,
        point: RecoveryPoint {
            checkpoint_id: 7,
            timestamp_ms: NOW - 5000,
            name: String::new(),
        },
        from_generation: 2,
        phase,
        reverse,
        source_shut_down: false,
    };
    let stood = |c| StandDown {
        by: SiteId::minted("b".into()),
        cause: StandDownCause::Recovered(c),
        since_ms: NOW,
        divergence: None,
    };
    // Everything else looks healthy: replicating, a recent checkpoint.
    let own = [seen("p1", protected())];
    let p = peer(vec![seen("r1", recovery(NOW - 1000))]);
    let shown_with = |d: &StandDown| {
        evaluate(&LiveInputs {
            vpg: &g,
            protects: true,
            now_ms: NOW,
            own: &own,
            peer: Some(&p),
            plan_error: None,
            coordinated_checkpoint: None,
            test_overdue: false,
            stood_down: Some(d),
        })
    };
    let before = stood(claim(
        ClaimPhase::Running {
            operation: Operation::FailoverBeforeCommit,
        },
        false,
    ));
    let s = shown_with(&before);
    assert_eq!(
        shown(&s),
        (
            VpgStatus::FailingOver,
            VpgSubstatus::FailingOverBeforeCommit,
            AlertColor::Orange
        )
    );
    assert!(!s.level && s.figures.actual_rpo_secs.is_none());
    let committed = stood(claim(ClaimPhase::Committed { generation: 3 }, false));
    let s = shown_with(&committed);
    assert_eq!(
        shown(&s),
        (
            VpgStatus::NotMeetingSla,
            VpgSubstatus::NeedsConfiguration,
            AlertColor::Red
        )
    );
    assert!(
        s.figures
            .problems
            .iter()
            .any(|p| p == "reverse protection is not specified"),
        "{:?}",
        s.figures.problems
    );
    let reversed = stood(claim(ClaimPhase::Committed { generation: 3 }, true));
    assert_eq!(
        shown_with(&reversed).state.substatus,
        VpgSubstatus::NeedsConfiguration
    );
}
