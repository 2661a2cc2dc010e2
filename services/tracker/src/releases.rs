//! The releases page's data (`/api/releases?app=`): every release record of the releases
//! bucket (signed, stored, or rejected with its reason), by app, newest version first, each
//! with the hosts of the inventory that run it.

use fleetcast_events::tracker::{AgentSummary, AppReleases, HostRef, ReleaseRow};
use fleetcast_events::v1::{ReleaseRecord, ReleaseState};
use semver::Version;

/// `records` (as [`fleetcast_runtime::Bus::release_records`] lists them: by app, newest
/// version first) grouped by app, with the hosts among `agents` that run each version.
pub fn by_app(records: Vec<ReleaseRecord>, agents: &[AgentSummary]) -> Vec<AppReleases> {
    let mut out: Vec<AppReleases> = Vec::new();
    for record in records {
        let hosts = if record.state == ReleaseState::Rejected {
            Vec::new()
        } else {
            running(agents, &record.app, &record.version)
        };
        let row = ReleaseRow {
            version: record.version,
            state: record.state,
            updated: record.updated,
            blake3: record.blake3,
            reason: record.reason,
            stored: record.stored,
            hosts,
        };
        match out.last_mut() {
            Some(last) if last.app == record.app => last.releases.push(row),
            _ => out.push(AppReleases {
                app: record.app,
                releases: vec![row],
            }),
        }
    }
    out
}

fn running(agents: &[AgentSummary], app: &str, version: &Version) -> Vec<HostRef> {
    agents
        .iter()
        .filter(|row| {
            row.apps
                .get(app)
                .is_some_and(|a| a.running.as_ref() == Some(version))
        })
        .map(|row| HostRef {
            agent_id: row.agent_id.clone(),
            ring: row.ring.clone(),
            stale: row.stale,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcast_events::tracker::AppSummary;
    use fleetcast_events::v1::{AppState, RejectCode, Rejection};
    use fleetcast_events::{AgentId, AppName, RingName};
    use time::OffsetDateTime;

    fn record(app: &str, version: &str, state: ReleaseState) -> ReleaseRecord {
        ReleaseRecord {
            app: AppName::try_from(app).expect("name"),
            version: version.parse().expect("version"),
            state,
            blake3: None,
            reason: (state == ReleaseState::Rejected).then(|| Rejection {
                code: RejectCode::VersionNotNewer,
                message: "not newer".into(),
            }),
            manifest: None,
            stored: None,
            updated: OffsetDateTime::UNIX_EPOCH,
        }
    }

    fn agent(id: &str, app: &str, running: &str, stale: bool) -> AgentSummary {
        AgentSummary {
            agent_id: AgentId::try_from(id).expect("name"),
            host: id.into(),
            ring: RingName::from_static("canary"),
            labels: Default::default(),
            apps: [(
                AppName::try_from(app).expect("name"),
                AppSummary {
                    running: Some(running.parse().expect("version")),
                    ..AppSummary::new(AppState::Running)
                },
            )]
            .into(),
            metadata: None,
            agent_version: None,
            last_seen: OffsetDateTime::UNIX_EPOCH,
            stale,
        }
    }

    #[test]
    fn releases_are_grouped_by_app_with_the_hosts_that_run_them() {
        let records = vec![
            record("api", "2.0.0", ReleaseState::Signed),
            record("web", "1.1.0", ReleaseState::Stored),
            record("web", "1.1.0", ReleaseState::Rejected),
            record("web", "1.0.0", ReleaseState::Stored),
        ];
        let agents = [
            agent("h1", "web", "1.1.0", false),
            agent("h2", "web", "1.0.0", true),
            agent("h3", "api", "1.1.0", false),
        ];
        let apps = by_app(records, &agents);
        // Per app, each row as "version state" with its hosts.
        type Rows = Vec<(String, Vec<String>)>;
        let summary: Vec<(String, Rows)> = apps
            .iter()
            .map(|a| {
                let rows = a
                    .releases
                    .iter()
                    .map(|r| {
                        let hosts = r.hosts.iter().map(|h| h.agent_id.to_string()).collect();
                        (format!("{} {:?}", r.version, r.state), hosts)
                    })
                    .collect();
                (a.app.to_string(), rows)
            })
            .collect();
        let s = |v: &str| v.to_string();
        assert_eq!(
            summary,
            [
                (s("api"), vec![(s("2.0.0 Signed"), vec![])]),
                (
                    s("web"),
                    vec![
                        (s("1.1.0 Stored"), vec![s("h1")]),
                        // A refused archive of the same version runs nowhere.
                        (s("1.1.0 Rejected"), vec![]),
                        (s("1.0.0 Stored"), vec![s("h2")]),
                    ]
                ),
            ]
        );
        assert!(apps[1].releases[2].hosts[0].stale);
        assert_eq!(
            apps[1].releases[1].reason.as_ref().map(|r| r.code),
            Some(RejectCode::VersionNotNewer)
        );
    }
}
