//! The monitoring service: the event log and the active alerts.

use tandem_core::error::Violations;
use tandem_core::events::EventCode;
use tandem_core::ids::VpgId;
use tandem_proto::v1::{self, monitoring_service_server::MonitoringService};
use tonic::{Request, Response, Status};

use super::bad;
use crate::site::{EventQuery, SiteManager};

pub struct MonitoringApi(pub SiteManager);

/// Events answered per call when the query names no limit, and at most.
const DEFAULT_EVENTS: usize = 100;
const MAX_EVENTS: usize = 1000;

fn vpg_filter(v: &mut Violations, id: &str) -> Option<VpgId> {
    if id.is_empty() {
        None
    } else {
        v.absorb(VpgId::parse("vpg_id", id))
    }
}

#[tonic::async_trait]
impl MonitoringService for MonitoringApi {
    async fn list_events(
        &self,
        r: Request<v1::ListEventsQuery>,
    ) -> Result<Response<v1::EventList>, Status> {
        let r = r.into_inner();
        let mut v = Violations::new();
        let vpg = vpg_filter(&mut v, &r.vpg_id);
        let code = if r.code.is_empty() {
            None
        } else {
            let c = EventCode::from_code(&r.code);
            v.check(c.is_some(), "code", "unknown event code");
            c
        };
        v.check(
            r.limit as usize <= MAX_EVENTS,
            "limit",
            format!("at most {MAX_EVENTS}"),
        );
        v.into_result().map_err(bad)?;
        let q = EventQuery {
            vpg,
            code,
            after_id: r.after_id,
            limit: if r.limit == 0 {
                DEFAULT_EVENTS
            } else {
                r.limit as usize
            },
        };
        let events = self
            .0
            .events(q)
            .await?
            .into_iter()
            .map(|e| v1::Event {
                id: e.id,
                at_ms: e.at_ms,
                code: e.code.code().to_string(),
                vpg_id: e.vpg.map(|g| g.to_string()).unwrap_or_default(),
                description: e.description,
            })
            .collect();
        Ok(Response::new(v1::EventList { events }))
    }

    async fn list_alerts(
        &self,
        r: Request<v1::ListAlertsRequest>,
    ) -> Result<Response<v1::AlertList>, Status> {
        let mut v = Violations::new();
        let vpg = vpg_filter(&mut v, &r.into_inner().vpg_id);
        v.into_result().map_err(bad)?;
        let alerts = self
            .0
            .alerts(vpg)
            .await?
            .into_iter()
            .map(|a| v1::Alert {
                code: a.kind.code().to_string(),
                severity: match a.kind.severity() {
                    tandem_core::alerts::Severity::Warning => "warning",
                    tandem_core::alerts::Severity::Error => "error",
                }
                .to_string(),
                vpg_id: a.vpg.to_string(),
                vpg_name: a.vpg_name,
                summary: a.kind.summary().to_string(),
                detail: a.detail,
                since_ms: a.since_ms,
            })
            .collect();
        Ok(Response::new(v1::AlertList { alerts }))
    }
}
