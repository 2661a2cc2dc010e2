//! The release pipeline assembled for end-to-end tests: a real nats-server, a signing key, and
//! the watcher, signer and distributor running as tasks that can be started, killed (aborted
//! mid-job, so nothing is acked) and started again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::{kv, stream};
use fleetcast_events::names;
use fleetcast_events::tree::{ChunkList, TreeFile};
use fleetcast_events::v1::ReleaseRecord;
use fleetcast_events::{AppName, RingName, SecretKey, TrustedKeys};
use fleetcast_harness::NatsServer;
use fleetcast_package::chunking::{self, ChunkId};
use fleetcast_runtime::bus::Role;
use fleetcast_runtime::{Bus, BusError, Incoming, NatsSettings, Records};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub mod binaries;
pub mod browser;
pub mod checks;

pub const TIMEOUT: Duration = Duration::from_secs(60);

pub struct Pipeline {
    pub nats: NatsServer,
    /// The other nodes when `nats` is one of a cluster's.
    pub cluster: Vec<NatsServer>,
    /// The certificates when NATS requires TLS with client certificates.
    pub pki: Option<fleetcast_harness::tls::TestPki>,
    /// The NATS identities when the server authenticates clients and holds them to their
    /// role's permissions ([`Pipeline::new_with_permissions`]).
    pub accounts: Option<fleetcast_harness::accounts::Accounts>,
    pub dir: tempfile::TempDir,
    pub key: SecretKey,
    services: HashMap<String, (CancellationToken, JoinHandle<()>)>,
    /// The data folders of the agents started, whose apps are killed with the pipeline.
    agent_dirs: Vec<PathBuf>,
}

impl Drop for Pipeline {
    /// The test's runtime stops right after: the agents' tasks are dropped where they are and
    /// cannot stop their apps (each in its own process group), which would outlive the test.
    fn drop(&mut self) {
        for (token, handle) in self.services.values() {
            token.cancel();
            handle.abort();
        }
        kill_processes_under(&self.agent_dirs);
    }
}

/// Kills (SIGKILL, with their process groups) the processes whose working folder is under one
/// of `dirs`, the apps agents ran there: found in `/proc`, as the folder itself (a test's
/// `TempDir` dropped before the pipeline) may be gone already.
fn kill_processes_under(dirs: &[PathBuf]) {
    use nix::sys::signal::{Signal, kill, killpg};
    use nix::unistd::{Pid, getpgid, getpgrp};
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in processes.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Ok(cwd) = std::fs::read_link(entry.path().join("cwd")) else {
            continue;
        };
        let cwd = cwd.to_string_lossy();
        let cwd = Path::new(cwd.strip_suffix(" (deleted)").unwrap_or(&cwd));
        if !dirs.iter().any(|dir| cwd.starts_with(dir)) {
            continue;
        }
        let pid = Pid::from_raw(pid);
        let _ = match getpgid(Some(pid)) {
            Ok(group) if group != getpgrp() => killpg(group, Signal::SIGKILL),
            _ => kill(pid, Signal::SIGKILL),
        };
    }
}

impl Pipeline {
    /// A nats-server and a key pair; no services yet.
    pub async fn new() -> anyhow::Result<Pipeline> {
        Pipeline::on(vec![NatsServer::start().await?])
    }

    /// As [`Pipeline::new`] on a JetStream cluster of `nodes` servers: every client gets all
    /// their URLs, and streams and buckets are created with one replica per node.
    pub async fn new_cluster(nodes: usize) -> anyhow::Result<Pipeline> {
        Pipeline::on(NatsServer::start_cluster(nodes).await?)
    }

    /// As [`Pipeline::new`] on a JetStream hub, with a leaf node for a remote site's agents
    /// (`ops/nats/leaf-site.conf`): point an agent's `nats.url` at the returned server. Both
    /// are closed as shipped (accounts and TLS, issued for `agents`); everything connects as
    /// `admin` unless given its own identity.
    pub async fn new_with_leaf_for(
        agents: &[fleetcast_harness::accounts::AgentSpec],
    ) -> anyhow::Result<(Pipeline, NatsServer)> {
        let accounts = fleetcast_harness::accounts::Accounts::generate_with_tls(agents)?;
        let (hub, leaf) = NatsServer::start_hub_and_leaf(&accounts).await?;
        let mut p = Pipeline::on(vec![hub])?;
        p.accounts = Some(accounts);
        Ok((p, leaf))
    }

    /// [`Pipeline::new_with_leaf_for`] without agent identities.
    pub async fn new_with_leaf() -> anyhow::Result<(Pipeline, NatsServer)> {
        Pipeline::new_with_leaf_for(&[]).await
    }

    /// As [`Pipeline::new`] on a server that takes only TLS connections with a client
    /// certificate; every service and agent gets the certificates through its NATS settings.
    pub async fn new_tls() -> anyhow::Result<Pipeline> {
        let pki = fleetcast_harness::tls::TestPki::generate()?;
        let mut p = Pipeline::on(vec![NatsServer::start_tls(&pki).await?])?;
        p.pki = Some(pki);
        Ok(p)
    }

    /// As [`Pipeline::new`] on a server with fleetcast's accounts and per-role permissions
    /// (`ops/nats/gen-accounts`, issued for `agents`). The tests' own connection
    /// ([`Pipeline::bus`]) is the `admin` identity; services, agents and the CLI are given
    /// their own with [`Pipeline::nats_settings_as`] and [`Pipeline::agent_nats_settings`]
    /// (the `start_*_as_role` helpers do it).
    pub async fn new_with_permissions(
        agents: &[fleetcast_harness::accounts::AgentSpec],
    ) -> anyhow::Result<Pipeline> {
        let accounts = fleetcast_harness::accounts::Accounts::generate(agents)?;
        let server =
            NatsServer::start_with_config(&accounts.auth_conf()?, Some(&accounts.creds("admin")))
                .await?;
        Pipeline::on_with_accounts(vec![server], accounts)
    }

    /// As [`Pipeline::new_with_permissions`] on nats-server started from the shipped
    /// `ops/nats/secure.conf` (accounts and TLS issued by `ops/nats/gen-accounts --tls`): every
    /// client needs its credentials and the CA, and connects with `insecure_dev` off.
    pub async fn new_closed(
        agents: &[fleetcast_harness::accounts::AgentSpec],
    ) -> anyhow::Result<Pipeline> {
        let accounts = fleetcast_harness::accounts::Accounts::generate_with_tls(agents)?;
        let server =
            NatsServer::start_shipped("secure.conf", &accounts, &accounts.creds("admin")).await?;
        Pipeline::on_with_accounts(vec![server], accounts)
    }

    /// As [`Pipeline::new_closed`] on the shipped production cluster (three nodes from
    /// `ops/nats/cluster-node-N.conf`, [`NatsServer::start_shipped_cluster`]): every client
    /// gets all three URLs, and streams and buckets are created with three replicas.
    pub async fn new_closed_cluster(
        agents: &[fleetcast_harness::accounts::AgentSpec],
    ) -> anyhow::Result<Pipeline> {
        let accounts = fleetcast_harness::accounts::Accounts::generate_with_tls(agents)?;
        let servers = NatsServer::start_shipped_cluster(&accounts).await?;
        Pipeline::on_with_accounts(servers, accounts)
    }

    /// As [`Pipeline::on`], on servers that were started with `accounts`: the pipeline's
    /// clients are given those accounts' credentials.
    fn on_with_accounts(
        servers: Vec<NatsServer>,
        accounts: fleetcast_harness::accounts::Accounts,
    ) -> anyhow::Result<Pipeline> {
        let mut p = Pipeline::on(servers)?;
        p.accounts = Some(accounts);
        Ok(p)
    }

    fn on(mut servers: Vec<NatsServer>) -> anyhow::Result<Pipeline> {
        fleetcast_runtime::telemetry::init_tracing();
        if servers.is_empty() {
            bail!("no nats-server");
        }
        let nats = servers.remove(0);
        let dir = tempfile::Builder::new()
            .prefix("fleetcast-e2e-")
            .tempdir()?;
        let key = SecretKey::generate()?;
        std::fs::create_dir_all(dir.path().join("keys"))?;
        let key_file = dir.path().join("keys/signing.key");
        std::fs::write(&key_file, key.to_text())?;
        std::fs::set_permissions(
            &key_file,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )?;
        Ok(Pipeline {
            nats,
            cluster: servers,
            pki: None,
            accounts: None,
            dir,
            key,
            services: HashMap::new(),
            agent_dirs: Vec::new(),
        })
    }

    /// A pipeline with one watcher, signer and distributor running.
    pub async fn start() -> anyhow::Result<Pipeline> {
        let mut p = Pipeline::new().await?;
        p.start_watcher();
        p.start_signer();
        p.start_distributor("distributor");
        Ok(p)
    }

    pub fn nats_settings(&self) -> NatsSettings {
        let urls: Vec<String> = std::iter::once(&self.nats)
            .chain(&self.cluster)
            .map(|n| n.url())
            .collect();
        NatsSettings {
            url: urls.join(","),
            request_timeout: Duration::from_secs(5),
            replicas: urls.len(),
            credentials: self.accounts.as_ref().map(|a| a.creds("admin")),
            // Test servers on 127.0.0.1: most have no accounts or no TLS, so they say so; one
            // with both (the shipped configuration) gets the closed default.
            insecure_dev: !self.closed(),
            tls: match (&self.pki, self.accounts.as_ref().and_then(|a| a.ca())) {
                (Some(pki), _) => {
                    let (cert, key) = pki.pair("client");
                    Some(fleetcast_runtime::TlsSettings {
                        ca_file: pki.ca(),
                        cert_file: Some(cert),
                        key_file: Some(key),
                    })
                }
                (None, Some(ca_file)) => Some(fleetcast_runtime::TlsSettings {
                    ca_file,
                    cert_file: None,
                    key_file: None,
                }),
                (None, None) => None,
            },
            ..Default::default()
        }
    }

    /// Whether clients need credentials and TLS here (see [`Pipeline::new_closed`]).
    fn closed(&self) -> bool {
        self.accounts.is_some()
            && (self.pki.is_some() || self.accounts.as_ref().and_then(|a| a.ca()).is_some())
    }

    /// The NATS settings of a `role` (`watcher`, `signer`, `distributor`, `tracker`, `ci`,
    /// `operator`, `admin`) of a pipeline with permissions; else as [`Pipeline::nats_settings`].
    pub fn nats_settings_as(&self, role: &str) -> NatsSettings {
        NatsSettings {
            credentials: self.accounts.as_ref().map(|a| a.creds(role)),
            ..self.nats_settings()
        }
    }

    /// An agent's own NATS settings: its credentials and the inbox only it may read.
    pub fn agent_nats_settings(&self, id: &str) -> NatsSettings {
        match &self.accounts {
            Some(a) => NatsSettings {
                credentials: Some(a.agent_creds(id)),
                inbox_prefix: Some(fleetcast_harness::accounts::agent_inbox_prefix(id)),
                ..self.nats_settings()
            },
            None => self.nats_settings(),
        }
    }

    /// The watcher, signer and distributor, each with its own role's identity.
    pub fn start_pipeline_as_roles(&mut self) {
        let mut watcher = self.watcher_settings();
        watcher.nats = self.nats_settings_as("watcher");
        self.start_watcher_with(watcher);
        let mut signer = self.signer_settings();
        signer.nats = self.nats_settings_as("signer");
        self.start_signer_with(signer);
        let mut distributor = self.distributor_settings();
        distributor.nats = self.nats_settings_as("distributor");
        self.start_distributor_with("distributor", distributor);
    }

    /// The tracker with its own role's identity, and its replies sent as `tracker-reply`.
    pub fn start_tracker_as_role(&mut self, mut settings: fleetcast_tracker::Settings) {
        settings.nats = self.nats_settings_as("tracker");
        settings.reply_credentials = self.accounts.as_ref().map(|a| a.creds("tracker-reply"));
        self.start_tracker_with(settings);
    }

    /// An agent with its own identity (see [`Pipeline::agent_nats_settings`]).
    pub fn start_agent_as_itself(&mut self, mut settings: fleetcast_agent::Settings) {
        settings.nats = self.agent_nats_settings(&settings.agent_id);
        self.start_agent(settings);
    }

    /// A connection as `role`, binding to what the services created (as the CLI does).
    pub async fn bus_as(&self, role: &str) -> anyhow::Result<fleetcast_cli::CliBus> {
        fleetcast_cli::connect(&self.nats_settings_as(role), Duration::from_secs(20))
            .await
            .with_context(|| format!("connecting as {role}"))
    }

    pub fn drop_dir(&self) -> PathBuf {
        self.dir.path().join("drop")
    }

    pub fn work_dir(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    pub fn trusted(&self) -> TrustedKeys {
        TrustedKeys::new(vec![self.key.public()])
    }

    pub fn watcher_settings(&self) -> fleetcast_watcher::Settings {
        fleetcast_watcher::Settings {
            nats: self.nats_settings(),
            drop_dir: self.drop_dir(),
            work_dir: Some(self.work_dir()),
            settle: Duration::from_millis(400),
            ack_wait: Duration::from_secs(2),
            metrics_listen: any_port(),
            ..Default::default()
        }
    }

    pub fn signer_settings(&self) -> fleetcast_signer::Settings {
        fleetcast_signer::Settings {
            nats: self.nats_settings(),
            key_file: self.dir.path().join("keys/signing.key"),
            // Tests sign any app unless they say otherwise (the default signs none).
            known_apps: vec![fleetcast_signer::ANY_APP.into()],
            work_dir: Some(self.work_dir()),
            ack_wait: Duration::from_secs(2),
            metrics_listen: any_port(),
            ..Default::default()
        }
    }

    pub fn distributor_settings(&self) -> fleetcast_distributor::Settings {
        fleetcast_distributor::Settings {
            nats: self.nats_settings(),
            trusted_keys: vec![self.key.public().to_text()],
            work_dir: Some(self.work_dir()),
            ack_wait: Duration::from_secs(2),
            metrics_listen: any_port(),
            ..Default::default()
        }
    }

    pub fn start_watcher(&mut self) {
        self.start_watcher_with(self.watcher_settings());
    }

    pub fn start_watcher_with(&mut self, settings: fleetcast_watcher::Settings) {
        self.spawn("watcher", move |token| async move {
            if let Err(e) = fleetcast_watcher::run(settings, token).await {
                tracing::error!(error = %e, "watcher failed");
            }
        });
    }

    pub fn start_signer(&mut self) {
        let settings = self.signer_settings();
        self.spawn("signer", move |token| async move {
            if let Err(e) = fleetcast_signer::run(settings, token).await {
                tracing::error!(error = %e, "signer failed");
            }
        });
    }

    pub fn start_signer_with(&mut self, settings: fleetcast_signer::Settings) {
        self.spawn("signer", move |token| async move {
            if let Err(e) = fleetcast_signer::run(settings, token).await {
                tracing::error!(error = %e, "signer failed");
            }
        });
    }

    pub fn start_distributor_with(
        &mut self,
        name: &str,
        settings: fleetcast_distributor::Settings,
    ) {
        self.spawn(name, move |token| async move {
            if let Err(e) = fleetcast_distributor::run(settings, token).await {
                tracing::error!(error = %e, "distributor failed");
            }
        });
    }

    pub fn start_distributor(&mut self, name: &str) {
        let settings = self.distributor_settings();
        self.spawn(name, move |token| async move {
            if let Err(e) = fleetcast_distributor::run(settings, token).await {
                tracing::error!(error = %e, "distributor failed");
            }
        });
    }

    fn spawn<F, Fut>(&mut self, name: &str, f: F)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let token = CancellationToken::new();
        let handle = tokio::spawn(f(token.clone()));
        if let Some((old, handle)) = self.services.insert(name.into(), (token, handle)) {
            old.cancel();
            handle.abort();
        }
    }

    /// Stops a service the way a signal would (an agent stops its app first), and waits.
    pub async fn stop(&mut self, name: &str) {
        if let Some((token, handle)) = self.services.remove(name) {
            token.cancel();
            let _ = handle.await;
        }
    }

    pub fn tracker_settings(&self) -> fleetcast_tracker::Settings {
        fleetcast_tracker::Settings {
            nats: self.nats_settings(),
            // Closed deployments answer from the identity that may write inboxes only.
            reply_credentials: self.accounts.as_ref().map(|a| a.creds("tracker-reply")),
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            tick: Duration::from_millis(200),
            stale_after: Duration::from_secs(5),
            ..Default::default()
        }
    }

    pub fn start_tracker_with(&mut self, settings: fleetcast_tracker::Settings) {
        self.spawn("tracker", move |token| async move {
            if let Err(e) = fleetcast_tracker::run(settings, token).await {
                tracing::error!(error = %e, "tracker failed");
            }
        });
    }

    /// Sends an operator command to the tracker, as the CLI does.
    pub async fn tracker_command(
        &self,
        command: &fleetcast_events::tracker::Command,
    ) -> anyhow::Result<fleetcast_events::tracker::Reply> {
        fleetcast_cli::tracker(&self.cli().await?, command).await
    }

    /// An agent `id` in `ring` supervising `shapp` (a [`script_app`]), its state under `host`:
    /// `data/` for its installs, `state/` where the app writes which version runs.
    pub fn agent_settings(
        &self,
        id: &str,
        ring: &str,
        host: &std::path::Path,
    ) -> fleetcast_agent::Settings {
        let state = host.join("state");
        let _ = std::fs::create_dir_all(&state);
        fleetcast_agent::Settings {
            nats: self.nats_settings(),
            agent_id: id.into(),
            ring: RingName::try_from(ring).expect("ring"),
            data_dir: host.join("data"),
            trusted_keys: vec![self.key.public().to_text()],
            heartbeat: Duration::from_secs(1),
            slot_retry: Duration::from_millis(500),
            apps: vec![fleetcast_agent::settings::AppSettings {
                name: AppName::from_static("shapp"),
                command: vec!["bin/run".into()],
                env: std::collections::BTreeMap::from([(
                    "STATE_DIR".to_string(),
                    state.display().to_string(),
                )]),
                health: fleetcast_agent::health::HealthGate {
                    stay_up: Duration::from_millis(300),
                    ..Default::default()
                },
                crash: Default::default(),
                grace: Duration::from_secs(5),
                user: None,
                group: None,
                verify_on_start: false,
                listen: Vec::new(),
            }],
            ..Default::default()
        }
    }

    /// Runs an agent in this process, as service `agent-<id>`.
    pub fn start_agent(&mut self, settings: fleetcast_agent::Settings) {
        let name = format!("agent-{}", settings.agent_id);
        self.agent_dirs.push(settings.data_dir.clone());
        self.spawn(&name, move |token| async move {
            if let Err(e) = fleetcast_agent::run(settings, token).await {
                tracing::error!(error = %e, "agent failed");
            }
        });
    }

    /// Kills a service the hard way: its task is dropped wherever it is, nothing is acked.
    pub fn kill(&mut self, name: &str) {
        if let Some((token, handle)) = self.services.remove(name) {
            handle.abort();
            token.cancel();
        }
    }

    /// The tests' own connection, with everything bound. It creates what is missing, as the
    /// services do, so a test can write before any service runs.
    pub async fn bus(&self) -> anyhow::Result<TestBus> {
        let cancel = CancellationToken::new();
        let settings = self.nats_settings();
        let connected = async {
            let bus = Bus::connect(&settings, "e2e", &cancel).await?;
            bus.bind(&cancel, || TestBus::bind(&bus)).await
        };
        tokio::time::timeout(
            Duration::from_secs(20),
            // Boxed: tests hold many of these futures, and a test thread's stack is small.
            Box::pin(connected),
        )
        .await
        .context("NATS not reachable within 20 s")?
        .context("connecting")
    }

    /// A connection as the CLI makes it.
    pub async fn cli(&self) -> anyhow::Result<fleetcast_cli::CliBus> {
        fleetcast_cli::connect(&self.nats_settings(), Duration::from_secs(20)).await
    }

    /// Waits for the first event on `subject` (from the stream's start) that `accept` takes.
    pub async fn wait_event<T: DeserializeOwned>(
        &self,
        subject: &str,
        accept: impl Fn(&T) -> bool,
    ) -> anyhow::Result<T> {
        let bus = self.bus().await?;
        wait_on(&bus.releases_stream, subject, accept).await
    }

    /// As `wait_event`, for agent status and heartbeats.
    pub async fn wait_status<T: DeserializeOwned>(
        &self,
        accept: impl Fn(&T) -> bool,
    ) -> anyhow::Result<T> {
        let bus = self.bus().await?;
        wait_on(&bus.status_stream, "fleetcast.v1.agent.>", accept).await
    }

    /// How many events were published on `subject`.
    pub async fn count_events(&self, subject: &str) -> anyhow::Result<u64> {
        let bus = self.bus().await?;
        let stream = bus.releases_stream.clone();
        let info = stream.info_with_subjects(subject).await?;
        let mut total = 0;
        let mut subjects = info;
        while let Some(entry) = subjects.next().await {
            total += entry?.1 as u64;
        }
        Ok(total)
    }

    /// Messages in the chunk stream: chunks and tree nodes.
    pub async fn stored_chunks(&self) -> anyhow::Result<u64> {
        let mut chunks = self.bus().await?.chunks;
        Ok(chunks.info().await?.state.messages)
    }
}

/// A loopback address on a port the system picks: tests run side by side, so the services'
/// default ports (8431-8433) would clash.
pub fn any_port() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A loopback address free right now, for a server whose address the test must know before it
/// starts (the tracker's HTTP port).
pub fn free_addr() -> std::net::SocketAddr {
    let port = fleetcast_harness::free_port().expect("free port");
    std::net::SocketAddr::from(([127, 0, 0, 1], port))
}

/// A release read back the way an agent will: the record's signed manifest (verified), its
/// tree and every chunk fetched by direct get and verified, every file reassembled and checked
/// against its signed hash. Returns path → content.
pub async fn reassemble(
    bus: &TestBus,
    trusted: &TrustedKeys,
    app: &str,
    version: &semver::Version,
) -> anyhow::Result<HashMap<String, Vec<u8>>> {
    let files = release_files(bus, trusted, app, version).await?;
    let mut out = HashMap::new();
    for TreeFile { entry, chunks } in files {
        if entry.link.is_some() {
            continue;
        }
        let ChunkList::Listed(chunks) = chunks else {
            anyhow::bail!("chunk list of {} not read", entry.path);
        };
        let mut content = Vec::with_capacity(entry.size as usize);
        for c in &chunks {
            let id = ChunkId::from_hex(&c.id)?;
            content.extend_from_slice(&stored_object(bus, app, &id, c.len).await?);
        }
        anyhow::ensure!(
            blake3::hash(&content).to_hex().as_str() == entry.blake3,
            "{} does not match the manifest",
            entry.path
        );
        out.insert(entry.path.clone(), content);
    }
    Ok(out)
}

/// A chunk or tree node of `app` from the store, verified against its name.
pub async fn stored_object(
    bus: &TestBus,
    app: &str,
    id: &ChunkId,
    len: u32,
) -> anyhow::Result<Vec<u8>> {
    let msg = bus
        .chunks
        .direct_get_last_for_subject(names::chunk_subject(app, &id.to_hex()))
        .await?;
    Ok(chunking::verify(id, len, &msg.payload)?.into_data())
}

/// The files of a stored release, read from its signed tree in the store (chunk lists
/// resolved), with the names of every tree node read.
pub async fn release_files(
    bus: &TestBus,
    trusted: &TrustedKeys,
    app: &str,
    version: &semver::Version,
) -> anyhow::Result<Vec<TreeFile>> {
    let manifest = stored_manifest(bus, app, version)
        .await?
        .verify(trusted, time::OffsetDateTime::now_utc())?;
    let mut nodes = HashMap::new();
    let mut wanted = vec![manifest.tree.node()?];
    // Every node reachable from the root, level by level (file lists, then chunk lists).
    while let Some(r) = wanted.pop() {
        if nodes.contains_key(&r.hash) {
            continue;
        }
        let bytes = stored_object(bus, app, &ChunkId(r.hash.0), r.len).await?;
        wanted.extend(fleetcast_events::tree::children(&bytes)?);
        nodes.insert(r.hash, bytes);
    }
    Ok(fleetcast_events::tree::read_all(
        manifest.tree.node()?,
        manifest.tree.files,
        |r| nodes.get(&r.hash).map(Vec::as_slice),
    )?)
}

/// The signed manifest of `app` `version` as its release record holds it.
pub async fn stored_manifest(
    bus: &TestBus,
    app: &str,
    version: &semver::Version,
) -> anyhow::Result<fleetcast_events::SignedManifest> {
    let record: ReleaseRecord = bus
        .records
        .release_record(app, version)
        .await
        .map_err(anyhow::Error::msg)?
        .context("no release record")?;
    record.manifest.context("record has no manifest")
}

/// Chunk ids of a stored release.
pub async fn chunk_ids(
    bus: &TestBus,
    trusted: &TrustedKeys,
    app: &str,
    version: &semver::Version,
) -> anyhow::Result<std::collections::HashSet<String>> {
    Ok(release_files(bus, trusted, app, version)
        .await?
        .into_iter()
        .flat_map(|f| match f.chunks {
            ChunkList::Listed(list) => list.into_iter().map(|c| c.id).collect(),
            ChunkList::Tree { .. } => Vec::new(),
        })
        .collect())
}

/// Waits until `check` holds; fails the test after [`TIMEOUT`], naming `what` it waited for.
pub async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the agent's journal of an app (kept in the app's folder `app_dir`) says
/// `version` is committed.
pub async fn journal_commits(app_dir: &Path, version: &str) {
    let want = semver::Version::parse(version).expect("version");
    journal_until(app_dir, &format!("{version} committed"), |j| {
        j.committed.as_ref() == Some(&want)
    })
    .await;
}

/// Waits until the agent's journal of an app (kept in `app_dir`) says `version` is refused
/// (rolled back, or never started).
pub async fn journal_refuses(app_dir: &Path, version: &str) {
    let want = semver::Version::parse(version).expect("version");
    journal_until(app_dir, &format!("{version} refused"), |j| {
        j.is_refused(&want)
    })
    .await;
}

/// Waits until the journal in `app_dir` can be read and `check` holds of it.
async fn journal_until(
    app_dir: &Path,
    what: &str,
    check: impl Fn(&fleetcast_agent::journal::Journal) -> bool,
) {
    eventually(what, || {
        fleetcast_agent::journal::Journal::load(app_dir).is_ok_and(|j| check(&j))
    })
    .await;
}

/// `GET path` from the tracker's HTTP server on `port`: the body.
pub fn http_get(port: u16, path: &str) -> String {
    http_request(port, "GET", path, &[], "").1
}

/// `method path` with `headers` and `body` to the tracker's HTTP server on `port`: the status
/// and the body.
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    request.push_str(body);
    s.write_all(request.as_bytes()).expect("send");
    let mut response = String::new();
    s.read_to_string(&mut response).expect("read");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The tracker's dashboard on `port` as a person sees it: headless Chromium loads the page,
/// runs its script against the live API, and this is the DOM it ends with.
pub async fn dashboard_dom(port: u16) -> String {
    browser::page_dom(port, "/").await
}

/// A ring of `shapp`'s rollout policy: `parallel` hosts switching at once, halted at
/// `max_failures`, no soak, no window.
pub fn ring(
    name: &str,
    parallel: usize,
    max_failures: usize,
) -> fleetcast_tracker::policy::RingPolicy {
    use fleetcast_tracker::policy::{Amount, RingPolicy};
    RingPolicy {
        name: RingName::try_from(name).expect("ring"),
        parallel: Amount::Count(parallel),
        soak: Duration::ZERO,
        max_failures: Amount::Count(max_failures),
        min_results: 1,
        windows: vec![],
    }
}

/// The tracker (with `settings`, its rollout policy for `shapp` `policy`) and agents
/// `(id, ring)` of `shapp` ([`Pipeline::agent_settings`]) in pipeline `p`, every agent known
/// to the tracker before this returns: the hosts' folder and the tracker's HTTP port.
pub async fn fleet_in(
    p: &mut Pipeline,
    settings: fleetcast_tracker::Settings,
    policy: fleetcast_tracker::policy::AppPolicy,
    agents: &[(&str, &str)],
) -> (tempfile::TempDir, u16) {
    let agents: Vec<LabelledAgent> = agents
        .iter()
        .map(|&(id, ring)| (id, ring, &[][..]))
        .collect();
    fleet_labelled_in(p, settings, policy, &agents).await
}

/// An agent of [`fleet_labelled_in`]: its id, its ring and its labels (name, value).
pub type LabelledAgent<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);

/// As [`fleet_in`], each agent `(id, ring, labels)` carrying its labels.
pub async fn fleet_labelled_in(
    p: &mut Pipeline,
    mut settings: fleetcast_tracker::Settings,
    policy: fleetcast_tracker::policy::AppPolicy,
    agents: &[LabelledAgent<'_>],
) -> (tempfile::TempDir, u16) {
    let port = free_addr().port();
    settings.listen = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    settings.apps.insert(AppName::from_static("shapp"), policy);
    p.start_tracker_with(settings);
    let hosts = tempfile::tempdir().expect("tmp");
    for (id, ring, labels) in agents {
        let mut s = p.agent_settings(id, ring, &hosts.path().join(id));
        s.labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        p.start_agent(s);
    }
    let bus = p.bus().await.expect("bus");
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let known = bus.fleet.keys().await.expect("keys").count().await;
        // Every agent, plus the tracker's cursor key.
        if known > agents.len() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "agents never reported"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (hosts, port)
}

/// Waits until `shapp`'s rollout is in phase `want` (asking the tracker as the CLI does).
pub async fn rollout_phase(
    p: &Pipeline,
    want: fleetcast_events::tracker::Phase,
) -> fleetcast_events::tracker::RolloutSummary {
    rollout_of_in_phase(p, "shapp", None, want, String::new).await
}

/// Waits until `app`'s rollout (of `version`, when given) is in phase `want`, asking the
/// tracker as the CLI does; on time-out the failure names the last rollout seen and what
/// `context` then says (the state of a host, say).
pub async fn rollout_of_in_phase(
    p: &Pipeline,
    app: &str,
    version: Option<&semver::Version>,
    want: fleetcast_events::tracker::Phase,
    context: impl Fn() -> String,
) -> fleetcast_events::tracker::RolloutSummary {
    let app = AppName::try_from(app).expect("app name");
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        // A tracker just (re)started may not answer yet.
        let reply = p
            .tracker_command(&fleetcast_events::tracker::Command::Show { app: app.clone() })
            .await;
        let seen = reply
            .ok()
            .and_then(|r| r.rollout)
            .filter(|r| version.is_none_or(|v| r.version == *v));
        if let Some(r) = seen.as_ref().filter(|r| r.phase == want) {
            return r.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{app}'s rollout{} never {want:?}: {seen:?}\n{}",
            version.map(|v| format!(" of {v}")).unwrap_or_default(),
            context()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

impl Pipeline {
    /// The config of an agent process (`fleetcast-agent --config`) on this pipeline's server
    /// that runs the [`script_app`] `shapp` with its `STATE_DIR` at `state`; `extra` is more
    /// top-level settings (TOML lines, before any table).
    pub fn script_agent_config(
        &self,
        agent_id: &str,
        data: &Path,
        state: &Path,
        extra: &str,
    ) -> String {
        format!(
            "agent_id = \"{agent_id}\"\ndata_dir = \"{}\"\ntrusted_keys = [\"{}\"]\nheartbeat = \"1s\"\nrecheck = \"2s\"\n{extra}\
             [nats]\nurl = \"{}\"\ninsecure_dev = true\n[[apps]]\nname = \"shapp\"\ncommand = [\"bin/run\"]\ngrace = \"2s\"\n\
             [apps.env]\nSTATE_DIR = \"{}\"\n[apps.health]\nstay_up = \"300ms\"\n",
            data.display(),
            self.key.public().to_text().trim(),
            self.nats.url(),
            state.display()
        )
    }
}

/// The `/proc/<pid>` folder of every process alive (zombies left out).
pub fn live_processes() -> Vec<PathBuf> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(|e| e.path())
        .filter(|dir| {
            let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
            !stat
                .rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .collect()
}

/// The version a [`script_app`] says runs, from its `STATE_DIR` (empty: none yet).
pub fn running(state: &Path) -> String {
    std::fs::read_to_string(state.join("running"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// A test application as a shell script: a healthy one records which version runs in
/// `$STATE_DIR/running` and idles; an unhealthy one exits with code 3 at once.
pub fn script_app(version: &str, healthy: bool) -> fleetcast_harness::fixtures::PackageBuilder {
    let script = if healthy {
        format!("#!/bin/sh\necho {version} > \"$STATE_DIR/running\"\nexec sleep 300\n")
    } else {
        "#!/bin/sh\necho crashing >&2\nexit 3\n".to_string()
    };
    fleetcast_harness::fixtures::PackageBuilder::new()
        .file("bin/run", script, 0o755)
        .file("VERSION", version.to_string(), 0o644)
}

impl Pipeline {
    /// Drops `package` as `<app>-<version>.zip` and waits until it is stored.
    pub async fn release(
        &self,
        app: &str,
        version: &str,
        package: &fleetcast_harness::fixtures::PackageBuilder,
    ) {
        std::fs::create_dir_all(self.drop_dir()).expect("drop dir");
        package
            .write_to(&self.drop_dir().join(format!("{app}-{version}.zip")))
            .expect("drop");
        let (want_app, want) = (
            app.to_string(),
            semver::Version::parse(version).expect("version"),
        );
        self.wait_event(
            names::RELEASE_STORED,
            move |e: &fleetcast_events::v1::ReleaseStored| e.app == want_app && e.version == want,
        )
        .await
        .expect("stored");
    }

    /// Drops `bytes` as `name` and returns the rejection the watcher published for it, once
    /// the file was moved to `rejected/`.
    pub async fn drop_rejected(
        &self,
        name: &str,
        bytes: &[u8],
    ) -> fleetcast_events::v1::PackageRejected {
        use fleetcast_events::v1::{PackageRejected, PackageSource};
        std::fs::create_dir_all(self.drop_dir()).expect("drop dir");
        std::fs::write(self.drop_dir().join(name), bytes).expect("drop");
        let want = name.to_string();
        let rejected = self
            .wait_event(names::PACKAGE_REJECTED, move |e: &PackageRejected| {
                matches!(&e.source, PackageSource::DropFolder { file } if *file == want)
            })
            .await
            .expect("rejected");
        let moved = self.drop_dir().join("rejected").join(name);
        eventually(&format!("{name} moved to rejected/"), || moved.is_file()).await;
        rejected
    }

    /// Writes the desired state for `app` in `ring`, as the tracker will (`fleetcast desire`).
    pub async fn desire(&self, app: &str, ring: &str, version: &str) {
        let cli = self.cli().await.expect("bus");
        let version = semver::Version::parse(version).expect("version");
        let app = AppName::try_from(app).expect("app");
        let ring = RingName::try_from(ring).expect("ring");
        fleetcast_cli::desire(&cli, &app, &ring, &version)
            .await
            .expect("desire");
    }
}

/// Every stream, bucket and store, bound: what tests look at and set up (an administrator's
/// view; no fleetcast role binds them all).
#[derive(Clone)]
pub struct TestBus {
    pub bus: Bus,
    pub releases_stream: stream::Stream,
    pub status_stream: stream::Stream,
    pub chunks: stream::Stream,
    pub records: Records,
    pub incoming: Incoming,
    pub desired: kv::Store,
    pub fleet: kv::Store,
    pub rollouts: kv::Store,
    pub trust: kv::Store,
}

fleetcast_runtime::bus_role!(TestBus);

impl Role for TestBus {
    async fn bind(bus: &Bus) -> Result<Self, BusError> {
        Ok(TestBus {
            releases_stream: bus.stream(names::RELEASES_STREAM).await?,
            status_stream: bus.stream(names::STATUS_STREAM).await?,
            chunks: bus.stream(names::CHUNKS_STREAM).await?,
            records: Records::bind(bus).await?,
            incoming: Incoming::bind(bus).await?,
            desired: bus.bucket(names::DESIRED_BUCKET).await?,
            fleet: bus.bucket(names::FLEET_BUCKET).await?,
            rollouts: bus.bucket(names::ROLLOUTS_BUCKET).await?,
            trust: bus.bucket(names::TRUST_BUCKET).await?,
            bus: bus.clone(),
        })
    }
}

async fn wait_on<T: DeserializeOwned>(
    stream: &async_nats::jetstream::stream::Stream,
    subject: &str,
    accept: impl Fn(&T) -> bool,
) -> anyhow::Result<T> {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    // A cluster that just lost a node answers no JetStream request until its leaders are
    // elected again: the consumer is asked for until then.
    let mut messages = loop {
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: subject.into(),
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await;
        let messages = match consumer {
            Ok(consumer) => consumer.messages().await.map_err(anyhow::Error::from),
            Err(e) => Err(e.into()),
        };
        match messages {
            Ok(messages) => break messages,
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, %subject, "no consumer yet, asking again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.context(format!("a consumer of {subject}"))),
        }
    };
    let found = tokio::time::timeout_at(deadline, async {
        while let Some(msg) = messages.next().await {
            let msg = msg?;
            if let Ok(event) = fleetcast_runtime::consume::decode::<T>(&msg)
                && accept(&event)
            {
                return Ok(event);
            }
        }
        bail!("event stream ended")
    })
    .await;
    found.with_context(|| format!("no matching event on {subject} within {TIMEOUT:?}"))?
}

/// The errors a NATS server sent one plain client. NATS refuses a publish or a subscription
/// by dropping it and telling the client asynchronously (`-ERR 'Permissions Violation …'`, a
/// connection event in async-nats, never an error from `publish`): red-team tests wait for
/// that, then check the stores for no effect.
#[derive(Clone, Default)]
pub struct Violations(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl Violations {
    /// `options` that also record every server error into this.
    pub fn record(&self, options: async_nats::ConnectOptions) -> async_nats::ConnectOptions {
        let seen = self.clone();
        options.event_callback(move |event| {
            let seen = seen.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    seen.0.lock().expect("lock").push(e.to_string());
                }
            }
        })
    }

    /// Whether any error recorded so far passes `check`.
    pub fn any(&self, check: impl Fn(&str) -> bool) -> bool {
        self.0.lock().expect("lock").iter().any(|e| check(e))
    }

    /// Whether the server refused `what` ("Publish", "Subscription") on `subject`.
    pub fn seen(&self, what: &str, subject: &str) -> bool {
        let quoted = format!("\"{subject}\"");
        self.any(|e| e.contains("Permissions Violation") && e.contains(what) && e.contains(&quoted))
    }

    /// Waits until the server refused a publish to `subject`.
    pub async fn publish_refused(&self, subject: &str) {
        eventually(&format!("publish to {subject} refused"), || {
            self.seen("Publish", subject)
        })
        .await;
    }

    /// Waits until the server refused a subscription to `subject`.
    pub async fn subscription_refused(&self, subject: &str) {
        eventually(&format!("subscription to {subject} refused"), || {
            self.seen("Subscription", subject)
        })
        .await;
    }
}

impl Pipeline {
    /// A plain client with `creds` (over TLS with the accounts' CA when they were issued with
    /// one; an agent's inbox prefix when given), recording what the server refuses it.
    pub async fn client_as(
        &self,
        creds: &Path,
        inbox_prefix: Option<String>,
    ) -> (async_nats::Client, Violations) {
        let violations = Violations::default();
        let mut options = with_creds(creds)
            .await
            .request_timeout(Some(Duration::from_secs(5)));
        if let Some(prefix) = inbox_prefix {
            options = options.custom_inbox_prefix(prefix);
        }
        if let Some(ca) = self.accounts.as_ref().and_then(|a| a.ca()) {
            options = options.require_tls(true).add_root_certificates(ca);
        }
        let client = violations
            .record(options)
            .connect(self.nats.url())
            .await
            .expect("connect");
        (client, violations)
    }

    /// Agent `id`'s own plain client: its credentials and its inbox.
    pub async fn agent_client(&self, id: &str) -> (async_nats::Client, Violations) {
        let accounts = self.accounts.as_ref().expect("accounts");
        self.client_as(
            &accounts.agent_creds(id),
            Some(fleetcast_harness::accounts::agent_inbox_prefix(id)),
        )
        .await
    }
}

/// How long a refused connection may take to be refused (a TLS handshake and a CONNECT).
pub const REFUSAL: Duration = Duration::from_secs(10);

/// Whether a client could connect and talk to the server with these options.
pub async fn admitted(options: async_nats::ConnectOptions, url: &str) -> bool {
    match tokio::time::timeout(REFUSAL, options.connect(url)).await {
        Ok(Ok(client)) => tokio::time::timeout(REFUSAL, client.flush())
            .await
            .is_ok_and(|r| r.is_ok()),
        _ => false,
    }
}

/// Connect options with the credentials file `creds`.
pub async fn with_creds(creds: &Path) -> async_nats::ConnectOptions {
    async_nats::ConnectOptions::new()
        .credentials_file(creds)
        .await
        .expect("credentials")
}
