//! NATS identities for tests, issued by the same tool operators use (`ops/nats/gen-accounts`):
//! an operator, the FLEETCAST account with one scoped signing key per role, a `.creds` file
//! per role and per agent, in a temporary folder.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// One agent of the fleet: its id, ring and apps (what its credentials are scoped to).
#[derive(Debug, Clone)]
pub struct AgentSpec {
    pub id: String,
    pub ring: String,
    pub apps: Vec<String>,
}

impl AgentSpec {
    pub fn new(id: &str, ring: &str, apps: &[&str]) -> AgentSpec {
        AgentSpec {
            id: id.into(),
            ring: ring.into(),
            apps: apps.iter().map(|a| a.to_string()).collect(),
        }
    }

    fn arg(&self) -> String {
        format!("{}={}:{}", self.id, self.ring, self.apps.join(","))
    }
}

pub struct Accounts {
    dir: tempfile::TempDir,
}

impl Accounts {
    /// Runs `ops/nats/gen-accounts` for `agents` into a new temporary folder.
    pub fn generate(agents: &[AgentSpec]) -> anyhow::Result<Accounts> {
        let dir = tempfile::Builder::new()
            .prefix("fleetcast-accounts-")
            .tempdir()?;
        let accounts = Accounts { dir };
        accounts.run(agents.iter().map(|a| vec!["--agent".into(), a.arg()]))?;
        Ok(accounts)
    }

    /// As [`Accounts::generate`], with TLS material too (`--tls`: a CA and a certificate for
    /// the servers, for 127.0.0.1 and localhost among others), as a production deployment.
    pub fn generate_with_tls(agents: &[AgentSpec]) -> anyhow::Result<Accounts> {
        let dir = tempfile::Builder::new()
            .prefix("fleetcast-accounts-")
            .tempdir()?;
        let accounts = Accounts { dir };
        accounts.run(
            std::iter::once(vec!["--tls".to_string()])
                .chain(agents.iter().map(|a| vec!["--agent".into(), a.arg()])),
        )?;
        Ok(accounts)
    }

    /// A leaf node's files for a remote site (`gen-accounts --deliver site=…`, needs TLS):
    /// auth.conf, files.conf, leaf.conf, its certificate and the leaf credentials, in a folder
    /// of their own. Returns the folder.
    pub fn deliver_site(&self) -> anyhow::Result<PathBuf> {
        let site = self.dir.path().join("site");
        self.run(std::iter::once(vec![
            "--tls".to_string(),
            "--deliver".into(),
            format!("site={}", site.display()),
        ]))?;
        Ok(site)
    }

    /// The CA the servers' certificate chains to, when issued with TLS.
    pub fn ca(&self) -> Option<PathBuf> {
        Some(self.dir.path().join("tls/ca.pem")).filter(|p| p.is_file())
    }

    /// Issues more agents (or the same ones again) into the same folder.
    pub fn add(&self, agents: &[AgentSpec]) -> anyhow::Result<()> {
        self.run(agents.iter().map(|a| vec!["--agent".into(), a.arg()]))
    }

    /// Issues a person's (or CI job's) own credentials as `role` (`operator` or `ci`):
    /// `gen-accounts --person NAME=ROLE`.
    pub fn add_person(&self, name: &str, role: &str) -> anyhow::Result<PathBuf> {
        self.run(std::iter::once(vec![
            "--person".into(),
            format!("{name}={role}"),
        ]))?;
        Ok(self
            .dir
            .path()
            .join("creds/people")
            .join(format!("{name}.creds")))
    }

    /// Revokes an agent's (or a role's) credentials: `auth_conf` then lists its key as revoked.
    pub fn revoke(&self, id: &str) -> anyhow::Result<()> {
        self.run(std::iter::once(vec!["--revoke".into(), id.into()]))
    }

    fn run(&self, args: impl Iterator<Item = Vec<String>>) -> anyhow::Result<()> {
        let script = crate::workspace_root().join("ops/nats/gen-accounts");
        let python = std::env::var_os("PYTHON").unwrap_or_else(|| "python3".into());
        let out = Command::new(&python)
            .arg(&script)
            .arg("--dir")
            .arg(self.dir.path())
            .args(args.flatten())
            .output()
            .with_context(|| format!("running {}", script.display()))?;
        if !out.status.success() {
            bail!(
                "{} failed: {}",
                script.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// The server's part: operator, accounts (to add to a server's configuration).
    pub fn auth_conf(&self) -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(self.dir.path().join("auth.conf"))?)
    }

    /// A role's credentials: `ci`, `operator`, `watcher`, `signer`, `distributor`, `tracker`,
    /// `admin`, `leaf`.
    pub fn creds(&self, role: &str) -> PathBuf {
        self.dir.path().join("creds").join(format!("{role}.creds"))
    }

    /// An agent's own credentials.
    pub fn agent_creds(&self, id: &str) -> PathBuf {
        self.dir
            .path()
            .join("creds/agents")
            .join(format!("{id}.creds"))
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// The inbox prefix an agent's identity may receive replies on.
pub fn agent_inbox_prefix(id: &str) -> String {
    format!("_INBOX.{id}")
}
