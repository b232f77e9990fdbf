//! A VPG as an operator sees it: its definition, this site's view of its state, the leader's
//! live figures; and the seed's VPG list as CSV.

use super::*;

/// A VPG as shown to an operator.
#[derive(Debug, Clone)]
pub struct VpgView {
    pub vpg: Vpg,
    pub own_site: SiteId,
    pub peer_name: String,
    pub state: VpgState,
    /// The leader's live snapshot; `None` when no leader answered (definition alone).
    pub live: Option<LiveStatus>,
    /// A failover test of it runs at this site.
    pub testing: bool,
    /// The site whose VMs of the VPG run, as this site knows it.
    pub owner: SiteId,
    /// This site stood the VPG down (another site runs its VMs).
    pub stood_down: Option<tandem_core::fence::StandDown>,
}

impl VpgView {
    /// The operation column: the operation the VPG is in, or its failover test.
    pub fn operation(&self) -> String {
        match self.vpg.operation {
            Some(o) => format!("{o:?}"),
            None if self.testing => "Failover Test".into(),
            None => String::new(),
        }
    }
}

impl SiteManager {
    pub(super) fn view(s: &SiteState, g: &Vpg) -> VpgView {
        let own = s
            .site_id()
            .cloned()
            .unwrap_or_else(|| SiteId::minted(String::new()));
        let peer_id = if g.protected_site == own {
            &g.recovery_site
        } else {
            &g.protected_site
        };
        let peer_name = s
            .peers
            .get(peer_id)
            .map(|p| p.name.clone())
            .unwrap_or_default();
        let stood_down = s.stood_down.get(&g.id).cloned();
        let owner = if let Some(d) = &stood_down {
            d.by.clone()
        } else if s.recoveries.contains_key(&g.id)
            || (g.operation == Some(Operation::Recovered) && g.recovery_site == own)
        {
            own.clone()
        } else if g.operation == Some(Operation::Recovered) {
            g.recovery_site.clone()
        } else {
            g.protected_site.clone()
        };
        // Until VRAs report in, what is known is the definition alone.
        let obs = VpgObservation {
            vm_count: g.vms.len(),
            operation: g
                .operation
                .or_else(|| stood_down.as_ref().and_then(|d| d.peer_operation())),
            sync: None,
            forced: false,
            pause: None,
            faults: match &stood_down {
                Some(d) if d.peer_operation().is_none() => {
                    vec![tandem_core::status::Fault::NeedsConfiguration]
                }
                _ => vec![],
            },
            backup_running: false,
            actual_rpo_secs: None,
            target_rpo_secs: g.settings.target_rpo_secs,
            history_met: false,
            has_checkpoints: false,
            after_rollback: false,
            test_overdue: false,
        };
        VpgView {
            vpg: g.clone(),
            own_site: own,
            peer_name,
            state: obs.evaluate(),
            live: None,
            testing: s.tests.contains_key(&g.id),
            owner,
            stood_down,
        }
    }

    /// Puts the leader's live snapshots into `views`.
    pub(super) async fn with_live(&self, mut views: Vec<VpgView>) -> Vec<VpgView> {
        let ids = if views.len() == 1 {
            vec![views[0].vpg.id.clone()]
        } else {
            Vec::new()
        };
        let mut live = control::live_statuses(self, ids).await;
        for v in &mut views {
            if let Some(l) = live.remove(&v.vpg.id) {
                v.state = l.state;
                v.live = Some(l);
            }
        }
        views
    }

    pub async fn vpg(&self, id: VpgId) -> ApiResult<VpgView> {
        let found = self.node.read({
            let id = id.clone();
            move |s| s.vpgs.get(&id).map(|g| Self::view(s, g))
        });
        let view = found
            .await?
            .ok_or_else(|| ApiError::from(DomainError::not_found("vpg", &id)))?;
        Ok(self.with_live(vec![view]).await.remove(0))
    }

    pub async fn vpgs(&self) -> ApiResult<Vec<VpgView>> {
        let views = self
            .node
            .read(|s| s.vpgs.values().map(|g| Self::view(s, g)).collect())
            .await?;
        Ok(self.with_live(views).await)
    }
}

/// The VPG list as CSV, with the columns of the seed's VPGs view.
pub fn vpgs_csv(views: &[VpgView]) -> String {
    fn cell(s: &str) -> String {
        if s.contains([',', '"', '\n']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_string()
        }
    }
    let mut out = String::from(
        "Alert Status,VPG Name,#VMs,Direction,Peer Site,Priority,Protection Status,State,Actual RPO,Operation\n",
    );
    for v in views {
        let direction = if v.vpg.protected_site == v.own_site {
            "Outgoing"
        } else {
            "Incoming"
        };
        let operation = v.operation();
        let row = [
            v.state.alert.as_str().to_string(),
            v.vpg.name.clone(),
            v.vpg.vms.len().to_string(),
            direction.to_string(),
            v.peer_name.clone(),
            v.vpg.settings.priority.as_str().to_string(),
            v.state.status.as_str().to_string(),
            v.state.substatus.as_str().to_string(),
            v.live
                .as_ref()
                .and_then(|l| l.figures.actual_rpo_secs)
                .map(|r| format!("{r}s"))
                .unwrap_or_default(),
            operation,
        ];
        out.push_str(&row.iter().map(|c| cell(c)).collect::<Vec<_>>().join(","));
        out.push('\n');
    }
    out
}
