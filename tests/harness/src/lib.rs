//! Test harness: a real nats-server with JetStream on an ephemeral loopback port and a temporary
//! store, which can be stopped and restarted (same port, same store) and is always killed and
//! cleaned up on drop; or a cluster of them. Also builders for test packages, hostile ones
//! included, and the plain clients tests run against what they start (`fleetcast`, HTTP).

pub mod accounts;
pub mod cli;
pub mod fixtures;
pub mod http;
pub mod proxy;
pub mod tls;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Where the added part of a server's configuration starts.
const CONFIG_MARK: &str = "# added configuration\n";

/// Version installed by `ops/install-nats-server` into `.tools/`.
const PROJECT_BINARY: &str = ".tools/nats-server/bin/nats-server";

pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    /// CA, client certificate and key, when the server requires TLS with client certificates.
    tls: Option<(PathBuf, PathBuf, PathBuf)>,
    /// The text of a `.creds` file, when the server authenticates clients.
    credentials: Option<String>,
    /// The CA of a server that requires TLS but no client certificate (the shipped configs).
    tls_ca: Option<PathBuf>,
    binary: PathBuf,
    config: PathBuf,
    store: tempfile::TempDir,
}

/// Finds nats-server: `NATS_SERVER_BIN`, then the project's own install, then `PATH`.
pub fn nats_server_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("NATS_SERVER_BIN") {
        return Ok(PathBuf::from(path));
    }
    let project = workspace_root().join(PROJECT_BINARY);
    if project.is_file() {
        return Ok(project);
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("nats-server");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    bail!("nats-server not found: set NATS_SERVER_BIN or run ops/install-nats-server")
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap_or_else(|_| PathBuf::from("."))
}

impl NatsServer {
    /// Starts a server and waits until JetStream answers.
    pub async fn start() -> anyhow::Result<NatsServer> {
        let mut server = NatsServer::configure(free_port()?, "")?;
        server.spawn().await?;
        Ok(server)
    }

    /// Starts a server that accepts only TLS connections from clients with a certificate signed
    /// by `pki`'s CA.
    pub async fn start_tls(pki: &tls::TestPki) -> anyhow::Result<NatsServer> {
        let (cert, key) = pki.pair("server");
        let config = format!(
            "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: true\n  timeout: 2\n}}\n",
            cert.display(),
            key.display(),
            pki.ca().display()
        );
        let mut server = NatsServer::configure(free_port()?, &config)?;
        let (cert, key) = pki.pair("client");
        server.tls = Some((pki.ca(), cert, key));
        server.spawn().await?;
        Ok(server)
    }

    /// Starts a server with `config` added to its own (listen address, JetStream store): e.g.
    /// the accounts `ops/nats/gen-accounts` writes ([`accounts::Accounts::auth_conf`]). With
    /// `credentials` (a `.creds` file), the harness and [`NatsServer::client_options`] connect
    /// with it; the identity needs JetStream's account info (`$JS.API.INFO`) to see the server
    /// ready.
    pub async fn start_with_config(
        config: &str,
        credentials: Option<&Path>,
    ) -> anyhow::Result<NatsServer> {
        let mut server = NatsServer::configure(free_port()?, config)?;
        if let Some(path) = credentials {
            server.credentials = Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?,
            );
        }
        server.spawn().await?;
        Ok(server)
    }

    /// Starts nats-server from a configuration file the project ships, `ops/nats/<name>`, as
    /// deployed: only its listen address (this test's loopback port), JetStream store (this
    /// server's own) and `./auth/` includes (`accounts`' folder, issued with TLS) are rewritten,
    /// and its monitoring port is left out. The harness connects with `credentials` and the
    /// accounts' CA.
    pub async fn start_shipped(
        name: &str,
        accounts: &accounts::Accounts,
        credentials: &Path,
    ) -> anyhow::Result<NatsServer> {
        let path = workspace_root().join("ops/nats").join(name);
        let shipped = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let port = free_port()?;
        let mut server = NatsServer::from_config(port, |store| {
            let auth = format!("include \"{}/", relative_to(store, accounts.dir()));
            let mut lines = Vec::new();
            for line in shipped.lines() {
                let trimmed = line.trim_start();
                let top_level = trimmed.len() == line.len();
                lines.push(if top_level && trimmed.starts_with("listen:") {
                    format!("listen: 127.0.0.1:{port}")
                } else if top_level && trimmed.starts_with("http:") {
                    continue;
                } else if trimmed.starts_with("store_dir:") {
                    format!("  store_dir: \"{}\"", store.join("js").display())
                } else {
                    line.replace("include \"./auth/", &auth)
                });
            }
            lines.join("\n") + "\n"
        })?;
        server.credentials = Some(
            std::fs::read_to_string(credentials)
                .with_context(|| format!("reading {}", credentials.display()))?,
        );
        server.tls_ca = accounts.ca();
        server.spawn().await?;
        Ok(server)
    }

    /// The configuration file the server runs with.
    pub fn config_file(&self) -> &Path {
        &self.config
    }

    /// Replaces the added configuration (as given to [`NatsServer::start_with_config`]) and
    /// has the running server reload it (SIGHUP), as an operator does after re-issuing
    /// accounts. Returns once the server has logged the reload.
    pub async fn reload_with_config(&mut self, config: &str) -> anyhow::Result<()> {
        let base = std::fs::read_to_string(&self.config)?;
        let head = base
            .split_once(CONFIG_MARK)
            .map_or(base.as_str(), |(head, _)| head);
        std::fs::write(&self.config, format!("{head}{CONFIG_MARK}{config}"))?;
        let log = self.store.path().join("nats.log");
        let reloads = |text: &str| text.matches("Reloaded server configuration").count();
        let before = reloads(&std::fs::read_to_string(&log).unwrap_or_default());
        let pid = self.pid().context("server not running")?;
        let status = Command::new("kill")
            .arg("-HUP")
            .arg(pid.to_string())
            .status()?;
        if !status.success() {
            bail!("kill -HUP {pid} failed");
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if reloads(&text) > before {
                break;
            }
            if let Some(failed) = text.lines().find(|l| l.contains("Failed to reload")) {
                bail!("nats-server did not reload: {failed}");
            }
            if Instant::now() > deadline {
                bail!("nats-server did not reload within 20 s: {text}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// The server's log so far (permission violations, authentication failures, …).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.store.path().join("nats.log")).unwrap_or_default()
    }

    /// Starts `nodes` servers forming one JetStream cluster on loopback, and waits until each
    /// answers JetStream requests (the cluster has elected its meta leader).
    pub async fn start_cluster(nodes: usize) -> anyhow::Result<Vec<NatsServer>> {
        let ports = (0..nodes)
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<anyhow::Result<Vec<(u16, u16)>>>()?;
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, route)| format!("nats://127.0.0.1:{route}"))
            .collect();
        let mut servers = Vec::new();
        for (i, (port, route)) in ports.iter().enumerate() {
            let routes = routes.join(", ");
            let cluster = format!(
                "server_name: n{i}\ncluster {{\n  name: fleetcast-test\n  listen: 127.0.0.1:{route}\n  routes: [{routes}]\n}}\n"
            );
            servers.push(NatsServer::configure(*port, &cluster)?);
        }
        NatsServer::launch_cluster(servers).await
    }

    /// Starts the configured nodes of one cluster, and waits until each answers JetStream
    /// requests. All are started before any is waited for: JetStream needs a quorum to answer.
    async fn launch_cluster(mut servers: Vec<NatsServer>) -> anyhow::Result<Vec<NatsServer>> {
        for server in &mut servers {
            server.launch()?;
        }
        for server in &mut servers {
            server.wait_ready().await?;
        }
        Ok(servers)
    }

    /// Starts the shipped production cluster, `ops/nats/cluster-node-{1,2,3}.conf` with their
    /// shared `ops/nats/cluster-common.conf`, as three nats-server processes on loopback. Only
    /// what must differ when three nodes share one machine is rewritten: each node's client,
    /// route and leaf node ports, its store, the route URLs (`nats-N:6222` becomes that node's
    /// loopback route port: the certificate `gen-accounts --tls` issues names 127.0.0.1 too),
    /// `client_advertise`, and the `./auth/` includes (`accounts`' folder, issued with TLS);
    /// monitoring is left out. Authentication, TLS (mutual on routes), the JetStream domain and
    /// lame duck settings stay as shipped. The harness connects as `admin` with the accounts'
    /// CA; returns once every node answers JetStream requests (the cluster has elected its meta
    /// leader).
    pub async fn start_shipped_cluster(
        accounts: &accounts::Accounts,
    ) -> anyhow::Result<Vec<NatsServer>> {
        let dir = workspace_root().join("ops/nats");
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
        };
        let common = read("cluster-common.conf")?;
        let ca = accounts
            .ca()
            .context("the accounts need TLS (generate_with_tls)")?;
        let admin = std::fs::read_to_string(accounts.creds("admin"))?;
        // (client, route, leaf node) port of each node.
        let ports = (0..3)
            .map(|_| Ok((free_port()?, free_port()?, free_port()?)))
            .collect::<anyhow::Result<Vec<(u16, u16, u16)>>>()?;
        let mut servers = Vec::new();
        for (i, &(port, _, _)) in ports.iter().enumerate() {
            let node = read(&format!("cluster-node-{}.conf", i + 1))?;
            let mut server = NatsServer::from_config(port, |_| {
                node.lines()
                    .map(|line| {
                        if line.starts_with("client_advertise:") {
                            format!("client_advertise: \"127.0.0.1:{port}\"")
                        } else {
                            line.to_string()
                        }
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
                    + "\n"
            })?;
            // The node's file includes ./cluster-common.conf, beside it: this node's copy.
            let store = server.store_dir().to_path_buf();
            let auth = format!("include \"{}/", relative_to(&store, accounts.dir()));
            let lines = cluster_common_for_node(&common, &ports, i, &store, &auth)?;
            std::fs::write(store.join("cluster-common.conf"), lines.join("\n") + "\n")?;
            server.credentials = Some(admin.clone());
            server.tls_ca = Some(ca.clone());
            servers.push(server);
        }
        NatsServer::launch_cluster(servers).await
    }

    /// A hub (JetStream in domain `fleetcast`, as `ops/nats/cluster-common.conf`, accepting
    /// leaf nodes over TLS, with `accounts`' operator and accounts) and a leaf node connected to
    /// it, configured by the shipped `ops/nats/leaf-site.conf` with the site's files that
    /// `gen-accounts --deliver site=…` writes (the leaf credentials, the site's auth.conf; no
    /// JetStream of its own: its clients use the hub's through it). `accounts` must be issued
    /// with TLS; the harness connects to both as `admin`. Returns once the leaf is linked.
    pub async fn start_hub_and_leaf(
        accounts: &accounts::Accounts,
    ) -> anyhow::Result<(NatsServer, NatsServer)> {
        let ca = accounts
            .ca()
            .context("the accounts need TLS (generate_with_tls)")?;
        let admin = std::fs::read_to_string(accounts.creds("admin"))?;
        let leaf_port = free_port()?;
        let tls =
            "  cert_file: $FLEETCAST_TLS_CERT\n  key_file: $FLEETCAST_TLS_KEY\n  timeout: 2\n";
        let hub_port = free_port()?;
        let mut hub = NatsServer::from_config(hub_port, |store| {
            let auth = relative_to(store, accounts.dir());
            format!(
                "listen: 127.0.0.1:{hub_port}\nmax_payload: 8MB\n\
                 jetstream {{\n  store_dir: \"{}\"\n  domain: fleetcast\n  max_file_store: 1TB\n}}\n\
                 include \"{auth}/auth.conf\"\ninclude \"{auth}/files.conf\"\n\
                 tls {{\n{tls}  ca_file: $FLEETCAST_TLS_CA\n}}\n\
                 leafnodes {{\n  listen: 127.0.0.1:{leaf_port}\n  tls {{\n{tls}  }}\n}}\n",
                store.join("js").display()
            )
        })?;
        hub.credentials = Some(admin.clone());
        hub.tls_ca = Some(ca.clone());
        hub.spawn().await?;

        let site = accounts.deliver_site()?;
        let shipped = std::fs::read_to_string(workspace_root().join("ops/nats/leaf-site.conf"))?;
        let port = free_port()?;
        let mut leaf = NatsServer::from_config(port, |store| {
            let include = format!("include \"{}/", relative_to(store, &site));
            let mut lines = Vec::new();
            for line in shipped.lines() {
                lines.push(if line.starts_with("listen:") {
                    format!("listen: 127.0.0.1:{port}")
                } else if line.starts_with("http:") {
                    continue;
                } else {
                    line.replace(
                        "$FLEETCAST_HUB_LEAF_URL",
                        &format!("\"nats-leaf://127.0.0.1:{leaf_port}\""),
                    )
                    .replace("include \"./auth/", &include)
                });
            }
            lines.join("\n") + "\n"
        })?;
        leaf.credentials = Some(admin);
        leaf.tls_ca = Some(ca);
        leaf.launch()?;
        // Linked once the hub has taken the leaf connection in the FLEETCAST account (its
        // clients' JetStream account query is not the leaf's to pass on, as an agent's is not).
        let deadline = Instant::now() + Duration::from_secs(20);
        while !leaf
            .log()
            .contains("Leafnode connection created for account")
        {
            if let Some(child) = leaf.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("leaf nats-server exited with {status}: {}", leaf.log());
            }
            if Instant::now() > deadline {
                bail!(
                    "the leaf node did not link to the hub within 20 s: {}",
                    leaf.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok((hub, leaf))
    }

    /// A server's config on `port` with its own store, plus `extra` lines; not started.
    /// `max_file_store` is set: JetStream reserves every stream's `max_bytes` (fleetcast's
    /// quotas) against it, and its default (75% of the free disk) would make a test's streams
    /// depend on how full the machine's disk is; tests store little.
    fn configure(port: u16, extra: &str) -> anyhow::Result<NatsServer> {
        NatsServer::from_config(port, |store| {
            format!(
                "listen: 127.0.0.1:{port}\nmax_payload: 8MB\njetstream {{\n  store_dir: \"{}\"\n  max_file_store: 1TB\n}}\n{CONFIG_MARK}{extra}",
                store.join("js").display(),
            )
        })
    }

    /// A server on `port` with its own folder and the config `text` makes for that folder;
    /// not started.
    fn from_config(port: u16, text: impl FnOnce(&Path) -> String) -> anyhow::Result<NatsServer> {
        let store = tempfile::Builder::new()
            .prefix("fleetcast-nats-")
            .tempdir()?;
        let config = store.path().join("nats.conf");
        std::fs::write(&config, text(store.path()))?;
        Ok(NatsServer {
            child: None,
            port,
            tls: None,
            credentials: None,
            tls_ca: None,
            binary: nats_server_binary()?,
            config,
            store,
        })
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server process (for measuring its CPU).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn store_dir(&self) -> &Path {
        self.store.path()
    }

    /// Kills the server (SIGKILL: a crash, not a clean shutdown).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port with the same store.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.spawn().await
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        self.launch()?;
        self.wait_ready().await
    }

    fn launch(&mut self) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.store.path().join("nats.log"))?;
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// How a test client connects (TLS with the test client certificate when required).
    pub fn client_options(&self) -> async_nats::ConnectOptions {
        let options = self.tls_options();
        match &self.credentials {
            Some(creds) => options
                .credentials(creds)
                .expect("credentials were read when the server started"),
            None => options,
        }
    }

    fn tls_options(&self) -> async_nats::ConnectOptions {
        match &self.tls {
            Some((ca, cert, key)) => async_nats::ConnectOptions::new()
                .require_tls(true)
                .add_root_certificates(ca.clone())
                .add_client_certificate(cert.clone(), key.clone()),
            None => match &self.tls_ca {
                Some(ca) => async_nats::ConnectOptions::new()
                    .require_tls(true)
                    .add_root_certificates(ca.clone()),
                None => async_nats::ConnectOptions::new(),
            },
        }
    }

    /// Ready means a client can connect and JetStream answers an account query.
    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                let log =
                    std::fs::read_to_string(self.store.path().join("nats.log")).unwrap_or_default();
                bail!("nats-server exited with {status}: {log}");
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
                && let Ok(client) = self.client_options().connect(self.url()).await
                && async_nats::jetstream::new(client)
                    .query_account()
                    .await
                    .is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("nats-server on port {} not ready after 20 s", self.port);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `cluster-common.conf` as node `node` of three on one machine has it (see
/// [`NatsServer::start_shipped_cluster`]): its listen ports from `ports` (client, route, leaf
/// node per node), its store under `store`, the routes to the others' loopback ports, `auth`
/// for the `./auth/` includes, and no monitoring port.
fn cluster_common_for_node(
    common: &str,
    ports: &[(u16, u16, u16)],
    node: usize,
    store: &Path,
    auth: &str,
) -> anyhow::Result<Vec<String>> {
    let (port, route, leaf) = ports[node];
    let mut block = String::new();
    let mut lines = Vec::new();
    for line in common.lines() {
        let trimmed = line.trim_start();
        let top_level = trimmed.len() == line.len();
        if top_level && let Some(name) = trimmed.strip_suffix('{') {
            block = name.trim().to_string();
        } else if top_level && trimmed.starts_with('}') {
            block.clear();
        }
        let route_url = (1..=3).find_map(|n| {
            trimmed
                .starts_with(&format!("nats-route://nats-{n}:6222"))
                .then(|| ports[n - 1].1)
        });
        lines.push(if trimmed.starts_with("listen:") {
            let listen = match block.as_str() {
                "" => port,
                "cluster" => route,
                "leafnodes" => leaf,
                other => bail!("cluster-common.conf: a listen in {other:?}"),
            };
            let indent = &line[..line.len() - trimmed.len()];
            format!("{indent}listen: 127.0.0.1:{listen}")
        } else if top_level && trimmed.starts_with("http:") {
            continue;
        } else if trimmed.starts_with("store_dir:") {
            format!("  store_dir: \"{}\"", store.join("js").display())
        } else if let Some(route_port) = route_url {
            format!("    nats-route://127.0.0.1:{route_port}")
        } else if trimmed.starts_with("advertise:") || trimmed.starts_with("client_advertise:") {
            bail!("cluster-common.conf: an advertise the harness does not rewrite: {line}");
        } else {
            line.replace("include \"./auth/", auth)
        });
    }
    Ok(lines)
}

/// `target` as a path relative to the folder `from`: nats-server resolves an `include` relative
/// to the including file's folder, even an absolute one.
fn relative_to(from: &Path, target: &Path) -> String {
    let up = from.components().skip(1).map(|_| "..").collect::<Vec<_>>();
    let down = target.strip_prefix("/").unwrap_or(target);
    let mut path = PathBuf::from(up.join("/"));
    path.push(down);
    path.display().to_string()
}

/// A loopback port nothing listens on, for a server a test starts next. Drawn below Linux's
/// ephemeral range (32768 and up): a port from that range can be taken by any outgoing
/// connection between this check and the server's bind, and a test run opens thousands.
/// A port is handed out at most once per process: a test that asks for several before any
/// server binds (a cluster's client, route and leaf ports) must not get the same one twice.
pub fn free_port() -> anyhow::Result<u16> {
    use std::hash::{BuildHasher, Hasher};
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    for attempt in 0u64..200 {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(attempt);
        let port = 20_000 + (hasher.finish() % 12_000) as u16;
        if !handed_out.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed_out.push(port);
            return Ok(port);
        }
    }
    bail!("no free loopback port between 20000 and 32000 after 200 draws")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_is_handed_out_once_even_before_anything_binds_it() {
        let ports: Vec<u16> = (0..300).map(|_| free_port().expect("port")).collect();
        let distinct: std::collections::HashSet<&u16> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len());
    }

    #[tokio::test]
    async fn server_starts_restarts_and_cleans_up() {
        let mut server = NatsServer::start().await.expect("start");
        let client = async_nats::connect(server.url()).await.expect("connect");
        let js = async_nats::jetstream::new(client);
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "T".into(),
            subjects: vec!["t".into()],
            ..Default::default()
        })
        .await
        .expect("stream");
        js.publish("t", "x".into())
            .await
            .expect("publish")
            .await
            .expect("ack");
        server.restart().await.expect("restart");
        let client = async_nats::connect(server.url()).await.expect("reconnect");
        let mut stream = async_nats::jetstream::new(client)
            .get_stream("T")
            .await
            .expect("stream kept");
        assert_eq!(stream.info().await.expect("info").state.messages, 1);
        let dir = server.store_dir().to_path_buf();
        drop(server);
        assert!(!dir.exists());
    }
}
