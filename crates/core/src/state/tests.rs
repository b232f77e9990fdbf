//! The state machine's rules, command by command, on small states.

use super::*;
use crate::vpg::VpgSettings;

/// Site `a` with VPG `mine` (protected here) and `theirs` (protected by `b`).
fn state() -> SiteState {
    let mut s = SiteState {
        identity: Some(SiteIdentity {
            id: SiteId::minted("a".into()),
            name: "a".into(),
            created_at_ms: 0,
        }),
        ..Default::default()
    };
    for (id, protected, recovery) in [("mine", "a", "b"), ("theirs", "b", "a")] {
        let vpg = Vpg {
            reversed_at: 0,
            id: VpgId::minted(id.into()),
            name: id.into(),
            generation: 4,
            protected_site: SiteId::minted(protected.into()),
            recovery_site: SiteId::minted(recovery.into()),
            settings: VpgSettings::default(),
            vms: Vec::new(),
            created_at_ms: 0,
            updated_at_ms: 0,
            operation: None,
            paused: false,
            keep_recovery_disks: false,
            delete_started_ms: 0,
            keep_removed_recovery_disks: false,
            kept_recovery_vms: Default::default(),
            manager_paused_until_ms: 0,
        };
        s.vpgs.insert(vpg.id.clone(), vpg);
    }
    s
}

#[test]
fn a_recorded_status_survives_until_its_vpg_is_deleted_and_only_changes_are_events() {
    use crate::status::{AlertColor, VpgState, VpgStatus, VpgSubstatus};
    let mut s = state();
    let id = VpgId::minted("mine".into());
    let state_of = |status, substatus| VpgState {
        status,
        substatus,
        alert: AlertColor::Green,
    };
    let events = s.events.len();
    s.apply(Command::RecordStatus {
        vpg: id.clone(),
        state: state_of(VpgStatus::MeetingSla, VpgSubstatus::None),
        event: None,
    })
    .unwrap();
    assert_eq!(s.events.len(), events, "a first status is no event");
    let change = crate::events::NewEvent {
        at_ms: 1,
        code: crate::events::EventCode::StatusChanged,
        vpg: Some(id.clone()),
        description: "VPG \"mine\": Meeting SLA -> Not Meeting SLA".into(),
    };
    let down = state_of(VpgStatus::NotMeetingSla, VpgSubstatus::RecoveryIsPossible);
    s.apply(Command::RecordStatus {
        vpg: id.clone(),
        state: down,
        event: Some(change.clone()),
    })
    .unwrap();
    assert_eq!(s.events.len(), events + 1);
    assert_eq!(s.recorded_status[&id], down);
    // A VPG unknown (deleted since the monitor looked) keeps nothing.
    let gone = VpgId::minted("gone".into());
    s.apply(Command::RecordStatus {
        vpg: gone.clone(),
        state: down,
        event: Some(change),
    })
    .unwrap();
    assert!(!s.recorded_status.contains_key(&gone));
    assert_eq!(s.events.len(), events + 1);
    s.apply(Command::DeleteVpg {
        id: id.clone(),
        now_ms: 0,
    })
    .unwrap();
    assert!(s.recorded_status.is_empty());
}

fn pause(s: &mut SiteState, id: &str, paused: bool) -> CommandOutcome {
    s.apply(Command::SetVpgPaused {
        id: VpgId::minted(id.into()),
        paused,
    })
}

#[test]
fn pause_and_resume_keep_the_generation() {
    let mut s = state();
    let id = VpgId::minted("mine".into());
    pause(&mut s, "mine", true).unwrap();
    assert!(s.vpgs[&id].paused);
    assert_eq!(
        s.vpgs[&id].generation, 4,
        "a pause is not a definition change"
    );
    pause(&mut s, "mine", false).unwrap();
    assert!(!s.vpgs[&id].paused);
}

#[test]
fn pause_is_refused_at_the_recovery_site_during_operations_and_for_unknown_vpgs() {
    let mut s = state();
    let e = pause(&mut s, "theirs", true).unwrap_err();
    assert!(
        matches!(&e, DomainError::FailedPrecondition(m) if m.contains("protected by site b")),
        "{e:?}"
    );
    assert!(matches!(
        pause(&mut s, "nope", true),
        Err(DomainError::NotFound { .. })
    ));
    let id = VpgId::minted("mine".into());
    s.vpgs.get_mut(&id).unwrap().operation = Some(Operation::Deleting);
    assert!(matches!(
        pause(&mut s, "mine", true),
        Err(DomainError::FailedPrecondition(_))
    ));
    s.vpgs.get_mut(&id).unwrap().operation = Some(Operation::Creating);
    pause(&mut s, "mine", true).unwrap();
}

fn begin_update(s: &mut SiteState, id: &str) -> CommandOutcome {
    s.apply(Command::BeginVpgUpdate {
        id: VpgId::minted(id.into()),
        reason: "an edit is being stored on both sites".into(),
        now_ms: 7,
        task: None,
    })
}

#[test]
fn no_operation_while_a_definition_is_being_updated() {
    let mut s = state();
    let id = VpgId::minted("mine".into());
    begin_update(&mut s, "mine").unwrap();
    let refused = |r: CommandOutcome| match r {
        Err(DomainError::FailedPrecondition(m)) => {
            assert!(
                m.contains("being updated") && m.contains("stored on both"),
                "{m}"
            )
        }
        other => panic!("expected FAILED_PRECONDITION, got {other:?}"),
    };
    refused(begin_update(&mut s, "mine"));
    refused(pause(&mut s, "mine", true));
    refused(s.apply(Command::BeginVpgDelete {
        id: id.clone(),
        keep_recovery_disks: false,
        now_ms: 8,
    }));
    assert!(s.check_operable(&id).is_err());
    // Another VPG is not affected.
    assert!(s.check_operable(&VpgId::minted("theirs".into())).is_ok());
    s.apply(Command::EndVpgUpdate { id: id.clone() }).unwrap();
    pause(&mut s, "mine", true).unwrap();
    assert!(matches!(
        begin_update(&mut s, "nope"),
        Err(DomainError::NotFound { .. })
    ));
}

/// Pairs the test state with a site "b" (the recovery site of its VPGs).
fn pair_with_b(s: &mut SiteState) {
    let b = SiteId::minted("b".into());
    s.peers.insert(
        b.clone(),
        PeerSite {
            id: b,
            name: "b".into(),
            endpoints: vec!["127.0.0.1:1".into()],
            paired_at_ms: 0,
            bandwidth_limit_bytes_per_sec: 0,
            ca_pem: String::new(),
        },
    );
}

#[test]
fn pairing_tokens_are_kept_and_proposed_as_hashes_and_old_log_entries_still_apply() {
    use crate::pairing::{PairingSecret, PairingToken};
    let peer = |id: &str| PeerSite {
        id: SiteId::minted(id.into()),
        name: id.into(),
        endpoints: vec!["127.0.0.1:1".into()],
        paired_at_ms: 0,
        bandwidth_limit_bytes_per_sec: 0,
        ca_pem: String::new(),
    };
    let mut s = state();
    let secret = PairingSecret::from_random([7; 32]);
    let issue = Command::IssuePairingToken {
        token: PairingToken::new(&secret, 0, 1000),
        now_ms: 0,
    };
    // What the log and the state hold never contains the secret.
    let logged = serde_json::to_string(&issue).unwrap();
    assert!(!logged.contains(secret.reveal()), "{logged}");
    s.apply(issue).unwrap();
    assert!(!serde_json::to_string(&s).unwrap().contains(secret.reveal()));
    let accept = |hash: String, p: &str| Command::AcceptPairing {
        token_hash: hash,
        legacy_token: Default::default(),
        peer: peer(p),
        now_ms: 10,
    };
    let wrong = PairingSecret::presented("0".repeat(64));
    assert!(s.apply(accept(wrong.hash(), "c")).is_err());
    s.apply(accept(secret.hash(), "c")).unwrap();
    assert!(
        s.apply(accept(secret.hash(), "d")).is_err(),
        "a token is used once"
    );
    // Entries written before hashes were kept carry the secret: replayed, they apply
    // as they did.
    let mut old = state();
    let old_issue = r#"{"IssuePairingToken":{"token":{"token":"s3cret","issued_at_ms":0,"expires_at_ms":1000},"now_ms":0}}"#;
    old.apply(serde_json::from_str(old_issue).unwrap()).unwrap();
    let old_accept = format!(
        r#"{{"AcceptPairing":{{"token":"s3cret","peer":{},"now_ms":10}}}}"#,
        serde_json::to_string(&peer("e")).unwrap()
    );
    old.apply(serde_json::from_str(&old_accept).unwrap())
        .unwrap();
    assert!(old.peers.contains_key(&SiteId::minted("e".into())));
    assert!(!serde_json::to_string(&old).unwrap().contains("s3cret"));
}

#[test]
fn a_put_ends_the_update_and_a_floor_raises_the_generation() {
    let mut s = state();
    pair_with_b(&mut s);
    let id = VpgId::minted("mine".into());
    begin_update(&mut s, "mine").unwrap();
    let vpg = s.vpgs[&id].clone();
    let put = |s: &mut SiteState, expected, floor| {
        s.apply(Command::PutVpg {
            vpg: vpg.clone(),
            expected_generation: Some(expected),
            generation_floor: floor,
            event: None,
        })
    };
    assert_eq!(put(&mut s, 4, Some(9)), Ok(Applied::Generation(9)));
    assert!(s.check_operable(&id).is_ok(), "the put ended the update");
    // A floor below the next generation changes nothing.
    assert_eq!(put(&mut s, 9, Some(3)), Ok(Applied::Generation(10)));
    assert!(matches!(
        put(&mut s, 9, None),
        Err(DomainError::Conflict { .. })
    ));
}

/// An edit's task starts with its update, in one commit, and only if the update
/// does; its event is stored with the definition, and only if the put succeeds.
#[test]
fn an_edit_starts_its_task_with_the_update_and_stores_its_event_with_the_put() {
    let mut s = state();
    pair_with_b(&mut s);
    let id = VpgId::minted("mine".into());
    let begin = |s: &mut SiteState| {
        s.apply(Command::BeginVpgUpdate {
            id: id.clone(),
            reason: "an edit".into(),
            now_ms: 7,
            task: Some(crate::tasks::NewTask {
                kind: crate::tasks::TaskKind::EditVpg,
                vpg: Some(id.clone()),
                started_ms: 7,
                generation: Some(5),
                message: "storing".into(),
            }),
        })
    };
    let tasks = s.tasks.all().count();
    let Ok(Applied::Task(task)) = begin(&mut s) else {
        panic!("the update answers its task");
    };
    assert_eq!(s.tasks.get(task).map(|t| t.generation), Some(Some(5)));
    assert!(begin(&mut s).is_err(), "a second update is refused");
    assert_eq!(s.tasks.all().count(), tasks + 1, "and starts no task");

    let event = |text: &str| crate::events::NewEvent {
        at_ms: 8,
        code: crate::events::EventCode::VpgEdited,
        vpg: Some(id.clone()),
        description: text.into(),
    };
    let vpg = s.vpgs[&id].clone();
    let events = s.events.len();
    let put = |s: &mut SiteState, expected, text: &str| {
        s.apply(Command::PutVpg {
            vpg: vpg.clone(),
            expected_generation: Some(expected),
            generation_floor: None,
            event: Some(event(text)),
        })
    };
    assert!(
        put(&mut s, 3, "stale").is_err(),
        "a stale generation is refused"
    );
    assert_eq!(s.events.len(), events, "and records no event");
    put(&mut s, 4, "edited").unwrap();
    assert_eq!(s.events.len(), events + 1);
    assert!(
        s.events
            .iter()
            .next_back()
            .is_some_and(|e| e.description == "edited"),
        "the put recorded its event"
    );
}

/// Starts the site's first task, of `kind` for VPG `id`.
fn start_test_task(s: &mut SiteState, kind: crate::tasks::TaskKind, id: &VpgId) {
    let task = s.apply(Command::StartTask {
        task: crate::tasks::NewTask {
            kind,
            vpg: Some(id.clone()),
            started_ms: 1000,
            generation: None,
            message: String::new(),
        },
    });
    assert_eq!(task, Ok(Applied::Task(1)));
}

/// Gives VPG `id` one VM (recovered on host h, datastore d, pool p).
fn add_test_vm(s: &mut SiteState, id: &VpgId) {
    s.vpgs.get_mut(id).unwrap().vms.push(crate::vpg::VpgVm {
        source: None,
        placement: crate::vpg::VmPlacement {
            disk_paths: Default::default(),
            vm_id: VmId::minted("vm".into()),
            recovery_host: HostId::minted("h".into()),
            recovery_datastore: DatastoreId::minted("d".into()),
            recovery_pool: PoolId::minted("p".into()),
            preseeded: false,
        },
        footprint: crate::vpg::VmFootprint {
            cpus: 1,
            vm_name: "vm".into(),
            cpu_reservation_mhz: 0,
            memory_reservation_mib: 0,
            memory_mib: 0,
            volumes: vec![(0, 0, 1 << 20)],
            journal_hard_limit: crate::vpg::JournalLimit::Unlimited,
            journal_warning: crate::vpg::JournalLimit::Unlimited,
        },
    });
}

/// A recovery of `theirs` at site `a` at the promoting step, about to end.
/// A failover of VPG `vpg` (operation `n`) at checkpoint 11, opening.
fn test_op(vpg: &str, n: &str, from_generation: u64) -> crate::recovery::RecoveryOp {
    use crate::recovery::{CommitPolicy, RecoveryKind, RecoveryPoint, RecoveryStep};
    crate::recovery::RecoveryOp {
        id: crate::ids::RecoveryOpId::minted(n.into()),
        kind: RecoveryKind::Failover,
        vpg: VpgId::minted(vpg.into()),
        task: 1,
        point: RecoveryPoint {
            checkpoint_id: 11,
            timestamp_ms: 500,
            name: String::new(),
        },
        policy: CommitPolicy::Manual,
        from_generation,
        new_generation: None,
        step: RecoveryStep::Opening,
        started_ms: 1000,
        step_since_ms: 1000,
        intent: None,
        volumes: Vec::new(),
        error: None,
        shutdown: crate::recovery::Shutdown::No,
        to_last_checkpoint: false,
        reverse: false,
    }
}

/// A move of `id` at site `a`, handing over at generation 9, ends.
fn promoting_op(s: &mut SiteState, id: &VpgId, reverse: bool) {
    s.vpgs.get_mut(id).unwrap().generation = 9;
    let mut op = test_op(id.as_str(), "r", 4);
    op.kind = crate::recovery::RecoveryKind::Move;
    op.new_generation = Some(9);
    op.step = crate::recovery::RecoveryStep::HandingOver;
    op.to_last_checkpoint = true;
    op.reverse = reverse;
    s.recoveries.insert(id.clone(), op);
    s.apply(Command::EndRecovery {
        vpg: id.clone(),
        op: crate::ids::RecoveryOpId::minted("r".into()),
        now_ms: 3000,
    })
    .unwrap();
}

#[test]
fn a_reversing_commit_turns_the_vpg_around_and_the_old_site_takes_the_new_direction() {
    use crate::vpg::{SourceVolume, VmSource};
    let mut a = state();
    let id = VpgId::minted("theirs".into());
    add_test_vm(&mut a, &id);
    let (h, d) = (HostId::minted("h".into()), DatastoreId::minted("d".into()));
    a.datastores.insert(
        d.clone(),
        Datastore {
            id: d.clone(),
            name: "d".into(),
            host_id: h.clone(),
            path: "/ds-a".into(),
            capacity_bytes: 1 << 40,
        },
    );
    let (hb, db, pb) = (
        HostId::minted("hb".into()),
        DatastoreId::minted("db".into()),
        PoolId::minted("pb".into()),
    );
    let original = "/ds-b/vm/c0u0.img".to_string();
    let vm = a.vpgs[&id].vms[0].placement.vm_id.clone();
    a.vpgs.get_mut(&id).unwrap().vms[0].source = Some(VmSource {
        host: hb.clone(),
        volumes: vec![SourceVolume {
            controller: 0,
            unit: 0,
            datastore: db.clone(),
            path: original.clone(),
        }],
    });
    let before = a.vpgs[&id].clone();

    // Without a pool at the old site the commit ends Recovered and says why.
    start_test_task(&mut a, crate::tasks::TaskKind::Move, &id);
    promoting_op(&mut a, &id, true);
    assert_eq!(a.vpgs[&id].operation, Some(Operation::Recovered));
    let said = &a.events.iter().last().unwrap().description;
    assert!(
        said.contains("reverse protection not started: no resource pool"),
        "{said}"
    );
    assert!(a.vms.is_empty());

    // With one it turns the VPG around one generation up.
    a.vpgs.insert(id.clone(), before.clone());
    a.vpgs.get_mut(&id).unwrap().settings.reverse.pool = Some(pb.clone());
    promoting_op(&mut a, &id, true);
    let turned = a.vpgs[&id].clone();
    assert_eq!(turned.operation, None);
    assert_eq!((turned.generation, turned.reversed_at), (10, 10));
    assert_eq!(turned.protected_site.as_str(), "a");
    assert_eq!(turned.recovery_site.as_str(), "b");
    let p = &turned.vms[0].placement;
    assert_eq!((&p.recovery_host, &p.recovery_datastore), (&hb, &db));
    assert_eq!(p.recovery_pool, pb);
    assert!(p.preseeded);
    assert_eq!(p.disk_paths.get(&0), Some(&original));
    assert_eq!(
        turned.settings.reverse.pool,
        Some(PoolId::minted("p".into()))
    );
    let replica = format!("/ds-a/theirs/{vm}/c0u0.replica");
    let here = &a.vms[&vm];
    assert_eq!(here.host_id, h);
    assert_eq!(here.volumes[0].path.as_deref(), Some(replica.as_str()));
    let source = turned.vms[0].source.as_ref().unwrap();
    assert_eq!(
        (&source.host, source.volumes[0].path.as_str()),
        (&h, replica.as_str())
    );
    // The protected plan runs the VM on its replica; the old site recovers onto the
    // original disk.
    let plans = crate::protection::protected_plans(&turned, &a).unwrap();
    assert_eq!(plans[0].vms[0].volumes[0].path, replica);
    assert!(plans[0].vms[0].volumes[0].preseeded);

    // Site b, which protected it at generation 4 (it may not know of the failover).
    let mut b = SiteState {
        identity: Some(SiteIdentity {
            id: SiteId::minted("b".into()),
            name: "b".into(),
            created_at_ms: 0,
        }),
        ..Default::default()
    };
    b.peers.insert(
        SiteId::minted("a".into()),
        crate::pairing::PeerSite {
            id: SiteId::minted("a".into()),
            name: "a".into(),
            endpoints: vec!["127.0.0.1:1".into()],
            paired_at_ms: 0,
            bandwidth_limit_bytes_per_sec: 0,
            ca_pem: String::new(),
        },
    );
    b.hosts.insert(
        hb.clone(),
        Host {
            id: hb.clone(),
            name: "hb".into(),
            vra_address: "127.0.0.1:2".into(),
            peer_vra_address: String::new(),
        },
    );
    b.datastores.insert(
        db.clone(),
        Datastore {
            id: db.clone(),
            name: "db".into(),
            host_id: hb.clone(),
            path: "/ds-b".into(),
            capacity_bytes: 4 << 20,
        },
    );
    b.pools.insert(
        pb.clone(),
        ResourcePool {
            id: pb.clone(),
            name: "pb".into(),
            cpu_mhz: 1000,
            memory_mib: 1000,
            storage_bytes: 1 << 30,
        },
    );
    b.vms.insert(
        vm.clone(),
        Vm {
            id: vm.clone(),
            name: "vm".into(),
            host_id: hb.clone(),
            power: crate::inventory::PowerState::Off,
            memory_mib: 1,
            cpus: 1,
            cpu_reservation_mhz: 0,
            memory_reservation_mib: 0,
            volumes: vec![crate::inventory::Volume {
                controller: 0,
                unit: 0,
                size_bytes: 1 << 20,
                datastore_id: db.clone(),
                path: None,
            }],
        },
    );
    let mut old = before.clone();
    old.protected_site = SiteId::minted("b".into());
    old.recovery_site = SiteId::minted("a".into());
    old.generation = 4;
    old.operation = None;
    b.vpgs.insert(id.clone(), old.clone());
    let put = |b: &mut SiteState, vpg: &Vpg| {
        b.apply(Command::PutVpg {
            vpg: vpg.clone(),
            expected_generation: Some(4),
            generation_floor: Some(11),
            event: None,
        })
    };
    // A definition that turns it around without being newer than b's is refused.
    let mut stale = turned.clone();
    stale.reversed_at = 4;
    assert!(put(&mut b, &stale).is_err());
    assert!(b.vms.contains_key(&vm));
    // Not before b stood down and counted what its VMs wrote there.
    let refused = put(&mut b, &turned);
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("standing down")),
        "{refused:?}"
    );
    let mut op = test_op(id.as_str(), "r", 4);
    op.new_generation = Some(10);
    op.reverse = true;
    let stand_down = crate::fence::StandDown {
        by: SiteId::minted("a".into()),
        cause: crate::fence::StandDownCause::Recovered(crate::fence::RecoveryClaim::ended(
            &op, true,
        )),
        since_ms: 3000,
        divergence: None,
    };
    b.apply(Command::StandDown {
        vpg: id.clone(),
        stand_down,
    })
    .unwrap();
    assert!(
        b.check_operable(&id).is_err(),
        "no operations while stood down"
    );
    assert!(put(&mut b, &turned).is_err(), "still counting");
    let divergence = vec![crate::fence::VolumeDivergence {
        host: hb.clone(),
        vm: vm.clone(),
        volume_id: 0,
        bytes: 1 << 20,
        known: true,
    }];
    b.apply(Command::RecordDivergence {
        vpg: id.clone(),
        divergence,
        now_ms: 3100,
    })
    .unwrap();
    let told = &b.events.iter().last().unwrap().description;
    assert!(told.contains("1048576 bytes"), "{told}");
    // The turn is taken: b is the recovery site, its VM is gone from its inventory
    // (its disk is the recovery disk, within the datastore's room).
    assert_eq!(put(&mut b, &turned), Ok(Applied::Generation(11)));
    assert!(
        b.stood_down.is_empty(),
        "the new direction ends the stand-down"
    );
    assert_eq!(b.vpgs[&id].recovery_site.as_str(), "b");
    assert!(!b.vms.contains_key(&vm));
    assert!(
        b.events
            .iter()
            .any(|e| e.code == crate::events::EventCode::ReverseProtection)
    );
    let plans = crate::protection::recovery_plans(&b.vpgs[&id], &b).unwrap();
    assert_eq!(plans[0].host, hb);
    assert_eq!(plans[0].vms[0].volumes[0].path, original);
    // Once turned, a definition of the old direction is refused.
    let mut back = old;
    back.reversed_at = 0;
    assert!(
        b.apply(Command::PutVpg {
            vpg: back,
            expected_generation: Some(11),
            generation_floor: None,
            event: None,
        })
        .is_err()
    );
}

#[test]
fn a_failover_moves_step_by_step_commits_to_a_new_generation_and_ends_recovered() {
    use crate::recovery::{
        RecoveryAdvance, RecoveryIntent, RecoveryKind, RecoveryPoint, RecoveryStep as Step,
    };
    let mut s = state();
    let id = VpgId::minted("theirs".into());
    add_test_vm(&mut s, &id);
    let generation = s.vpgs[&id].generation;
    let op = |vpg: &str, n: &str| test_op(vpg, n, generation);
    let refused = |r: CommandOutcome, words: &str| match r {
        Err(DomainError::FailedPrecondition(m)) => assert!(m.contains(words), "{m}"),
        other => panic!("expected FAILED_PRECONDITION ({words}), got {other:?}"),
    };
    refused(
        s.apply(Command::BeginRecovery {
            op: op("mine", "x"),
        }),
        "fail it over there",
    );
    s.apply(Command::BeginRecovery {
        op: op("theirs", "a"),
    })
    .unwrap();
    assert_eq!(s.vpgs[&id].operation, Some(Operation::FailoverBeforeCommit));
    refused(
        s.apply(Command::BeginRecovery {
            op: op("theirs", "b"),
        }),
        "cannot be failed over now",
    );
    let vpg = s.vpgs[&id].clone();
    refused(
        s.apply(Command::PutVpg {
            vpg,
            expected_generation: Some(generation),
            generation_floor: None,
            event: None,
        }),
        "editing it is not possible",
    );
    let advance = |op: &str, from, to, g: Option<u64>| Command::AdvanceRecovery {
        advance: RecoveryAdvance {
            vpg: id.clone(),
            op: crate::ids::RecoveryOpId::minted(op.into()),
            from,
            to,
            volumes: None,
            error: None,
            new_generation: g,
            point: None,
            now_ms: 2000,
        },
    };
    // Another operation's (or another step's) proposal changes nothing.
    s.apply(advance("b", Step::Opening, Step::BeforeCommit, None))
        .unwrap();
    s.apply(advance("a", Step::BeforeCommit, Step::Committing, None))
        .unwrap();
    assert_eq!(s.recoveries[&id].step, Step::Opening);
    s.apply(advance("a", Step::Opening, Step::BeforeCommit, None))
        .unwrap();
    assert_eq!(s.recoveries[&id].step_since_ms, 2000);
    // Not a step that follows.
    refused(
        s.apply(advance("a", Step::BeforeCommit, Step::Promoting, Some(9))),
        "cannot go from before commit to promoting",
    );
    // The first word stands.
    s.apply(Command::RecoveryInput {
        vpg: id.clone(),
        intent: RecoveryIntent::Commit,
    })
    .unwrap();
    s.apply(Command::RecoveryInput {
        vpg: id.clone(),
        intent: RecoveryIntent::Rollback,
    })
    .unwrap();
    assert_eq!(s.recoveries[&id].intent, Some(RecoveryIntent::Commit));
    s.apply(advance("a", Step::BeforeCommit, Step::Committing, None))
        .unwrap();
    assert_eq!(s.vpgs[&id].operation, Some(Operation::FailoverCommitting));
    refused(
        s.apply(Command::RecoveryInput {
            vpg: id.clone(),
            intent: RecoveryIntent::Rollback,
        }),
        "can no longer be rolled back",
    );
    assert!(
        s.apply(advance(
            "a",
            Step::Committing,
            Step::Promoting,
            Some(generation)
        ))
        .is_err(),
        "the generation must move on"
    );
    s.apply(advance(
        "a",
        Step::Committing,
        Step::Promoting,
        Some(generation + 5),
    ))
    .unwrap();
    assert_eq!(s.vpgs[&id].generation, generation + 5);
    assert_eq!(s.vpgs[&id].operation, Some(Operation::FailoverPromoting));
    start_test_task(&mut s, crate::tasks::TaskKind::Failover, &id);
    s.apply(Command::EndRecovery {
        vpg: id.clone(),
        op: crate::ids::RecoveryOpId::minted("a".into()),
        now_ms: 3000,
    })
    .unwrap();
    assert!(s.recoveries.is_empty());
    assert_eq!(s.vpgs[&id].operation, Some(Operation::Recovered));
    let events: Vec<_> = s.events.iter().map(|e| e.code).collect();
    assert!(
        events.contains(&crate::events::EventCode::RecoveryCommitted),
        "{events:?}"
    );

    // A move starts by preparing its source, learns its checkpoint from it, and hands
    // over after promoting; a rollback is possible until commit.
    s.vpgs.get_mut(&id).unwrap().operation = None;
    let mut mv = op("theirs", "m");
    mv.kind = RecoveryKind::Move;
    mv.step = Step::PreparingSource;
    s.apply(Command::BeginRecovery { op: mv }).unwrap();
    assert_eq!(s.vpgs[&id].operation, Some(Operation::MoveBeforeCommit));
    let mut to_opening = advance("m", Step::PreparingSource, Step::Opening, None);
    if let Command::AdvanceRecovery { advance } = &mut to_opening {
        advance.point = Some(RecoveryPoint {
            checkpoint_id: 77,
            timestamp_ms: 9,
            name: "move m".into(),
        });
    }
    s.apply(to_opening).unwrap();
    assert_eq!(s.recoveries[&id].point.checkpoint_id, 77);
    s.apply(Command::RecoveryInput {
        vpg: id.clone(),
        intent: RecoveryIntent::Rollback,
    })
    .unwrap();
    s.apply(advance("m", Step::Opening, Step::RollingBack, None))
        .unwrap();
    assert_eq!(s.vpgs[&id].operation, Some(Operation::MoveRollingBack));
    s.apply(Command::EndRecovery {
        vpg: id.clone(),
        op: crate::ids::RecoveryOpId::minted("m".into()),
        now_ms: 4000,
    })
    .unwrap();
    assert_eq!(s.vpgs[&id].operation, None, "rolled back: as it was");
}

#[test]
fn a_failover_test_runs_at_the_recovery_site_blocks_edits_and_keeps_its_result() {
    use crate::recovery::{FailoverTest, RecoveryPoint, TestProgress, TestStep, TestVerdict};
    let mut s = state();
    let id = VpgId::minted("theirs".into());
    let test = |vpg: &str, task: u64| FailoverTest {
        vpg: VpgId::minted(vpg.into()),
        task,
        point: RecoveryPoint {
            checkpoint_id: 11,
            timestamp_ms: 500,
            name: String::new(),
        },
        step: TestStep::Starting,
        started_ms: 1000,
        volumes: Vec::new(),
        verdict: None,
        stop_requested_ms: 0,
        error: None,
    };
    let refused = |r: CommandOutcome, words: &str| match r {
        Err(DomainError::FailedPrecondition(m)) => assert!(m.contains(words), "{m}"),
        other => panic!("expected FAILED_PRECONDITION ({words}), got {other:?}"),
    };
    refused(
        s.apply(Command::StartFailoverTest {
            test: test("theirs", 1),
        }),
        "no VMs",
    );
    add_test_vm(&mut s, &id);
    // Only where the VPG is recovered.
    refused(
        s.apply(Command::StartFailoverTest {
            test: test("mine", 1),
        }),
        "recovered at site b",
    );
    s.apply(Command::StartFailoverTest {
        test: test("theirs", 1),
    })
    .unwrap();
    refused(
        s.apply(Command::StartFailoverTest {
            test: test("theirs", 2),
        }),
        "already running",
    );
    // While it runs: no edit, no delete.
    let vpg = s.vpgs[&id].clone();
    refused(
        s.apply(Command::PutVpg {
            vpg,
            expected_generation: Some(4),
            generation_floor: None,
            event: None,
        }),
        "stop it before editing",
    );
    refused(
        s.apply(Command::BeginVpgDelete {
            id: id.clone(),
            keep_recovery_disks: false,
            now_ms: 9,
        }),
        "stop it before deleting",
    );
    // Progress from another test (a deposed leader's) changes nothing.
    let progress = |task, step| TestProgress {
        vpg: id.clone(),
        task,
        step,
        volumes: Vec::new(),
        error: None,
    };
    s.apply(Command::ProgressFailoverTest {
        progress: progress(2, TestStep::Running),
    })
    .unwrap();
    assert_eq!(s.tests[&id].step, TestStep::Starting);
    s.apply(Command::ProgressFailoverTest {
        progress: progress(1, TestStep::Running),
    })
    .unwrap();
    assert_eq!(s.tests[&id].step, TestStep::Running);
    // The first verdict stands; a stopping test stays stopping.
    let verdict = |passed: bool, note: &str| TestVerdict {
        passed,
        note: note.into(),
    };
    s.apply(Command::StopFailoverTest {
        vpg: id.clone(),
        verdict: verdict(false, "app did not start"),
        now_ms: 1500,
    })
    .unwrap();
    s.apply(Command::StopFailoverTest {
        vpg: id.clone(),
        verdict: verdict(true, "later"),
        now_ms: 1600,
    })
    .unwrap();
    assert_eq!(s.tests[&id].stop_requested_ms, 1500);
    s.apply(Command::ProgressFailoverTest {
        progress: progress(1, TestStep::Running),
    })
    .unwrap();
    assert_eq!(s.tests[&id].step, TestStep::Stopping);
    start_test_task(&mut s, crate::tasks::TaskKind::FailoverTest, &id);
    s.apply(Command::EndFailoverTest {
        vpg: id.clone(),
        task: 1,
        stopped_ms: 2000,
        left: Vec::new(),
    })
    .unwrap();
    let ended = s.tasks.get(1).unwrap();
    assert_eq!(ended.state, crate::tasks::TaskState::Failed, "{ended:?}");
    let event = s.events.iter().last().unwrap();
    assert_eq!(event.code, crate::events::EventCode::FailoverTestStopped);
    assert!(
        event.description.contains("failed (\"app did not start\")"),
        "{event:?}"
    );
    assert!(s.tests.is_empty());
    let r = &s.test_results[&id];
    assert_eq!(
        (r.stopped_ms, &r.verdict),
        (2000, &verdict(false, "app did not start"))
    );
    refused(
        s.apply(Command::StopFailoverTest {
            vpg: id.clone(),
            verdict: verdict(true, ""),
            now_ms: 3000,
        }),
        "no failover test running",
    );
}
