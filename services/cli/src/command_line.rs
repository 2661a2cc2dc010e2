//! `fleetcast`'s command line: its arguments, what each command does, and how it prints.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate as cli;
use clap::{Parser, Subcommand};
use fleetcast_events::tracker::{
    AgentSummary, Command as TrackerCommand, HistoryQuery, Lag, Laggard, Phase, Reply, TokenName,
    TokenRole,
};
use fleetcast_events::v1::HistoryKind;
use fleetcast_events::v1::{ReleaseRecord, ReleaseState};
use fleetcast_events::{AppName, RingName, Selector};
use fleetcast_package::ArchiveLimits;
use fleetcast_runtime::NatsSettings;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser)]
#[command(
    name = "fleetcast",
    version,
    about = "Publish releases and steer fleetcast",
    after_help = cli::exit::TABLE
)]
struct Args {
    /// NATS server URL (a cluster's nodes: comma-separated).
    #[arg(
        long,
        global = true,
        env = "FLEETCAST_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats_url: String,
    /// NATS `.creds` file (JWT + nkey) of this operator or CI job.
    #[arg(long, global = true, env = "FLEETCAST_NATS_CREDENTIALS")]
    nats_credentials: Option<PathBuf>,
    /// TLS: the CA certificate (PEM) the server's certificate must chain to.
    #[arg(long, global = true, env = "FLEETCAST_NATS_TLS_CA")]
    nats_tls_ca: Option<PathBuf>,
    /// TLS: this client's certificate (PEM), with --nats-tls-key.
    #[arg(
        long,
        global = true,
        env = "FLEETCAST_NATS_TLS_CERT",
        requires = "nats_tls_key"
    )]
    nats_tls_cert: Option<PathBuf>,
    /// TLS: this client's key (PEM), with --nats-tls-cert.
    #[arg(
        long,
        global = true,
        env = "FLEETCAST_NATS_TLS_KEY",
        requires = "nats_tls_cert"
    )]
    nats_tls_key: Option<PathBuf>,
    /// Connect without credentials or TLS: local development on 127.0.0.1 only (without it,
    /// a connection lacking either is refused).
    #[arg(
        long,
        global = true,
        env = "FLEETCAST_NATS_INSECURE_DEV",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    nats_insecure_dev: bool,
    #[command(subcommand)]
    command: Command,
}

impl Args {
    /// The same NATS settings a service reads from `[nats]`.
    fn nats(&self) -> NatsSettings {
        NatsSettings {
            url: self.nats_url.clone(),
            credentials: self.nats_credentials.clone(),
            tls: self
                .nats_tls_ca
                .clone()
                .map(|ca_file| fleetcast_runtime::TlsSettings {
                    ca_file,
                    cert_file: self.nats_tls_cert.clone(),
                    key_file: self.nats_tls_key.clone(),
                }),
            insecure_dev: self.nats_insecure_dev,
            ..Default::default()
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Create an Ed25519 signing key pair (the secret goes to the signer only).
    Keygen {
        #[arg(long, default_value = "keys")]
        dir: PathBuf,
        #[arg(long, default_value = "signing")]
        name: String,
        /// Replace existing key files.
        #[arg(long)]
        force: bool,
    },
    /// Upload a release archive and announce it (the CI path).
    Publish(PublishArgs),
    /// Set the version an app's agents in a ring should run (what the tracker does during a
    /// rollout; by hand, it deploys at once).
    Desire {
        app: AppName,
        version: semver::Version,
        #[arg(long, default_value = "default")]
        ring: RingName,
    },
    /// The fleet at a glance: agents per app, version and ring, and every app's rollout.
    Status,
    /// Every agent: ring, labels, per app the running version and state, last error (tracker's
    /// view).
    Agents {
        /// Only agents whose labels match, e.g. `role=web,region!=us`.
        #[arg(long = "where", value_name = "SELECTOR")]
        selector: Option<Selector>,
    },
    /// Hosts a rollout has reached that do not run its version, and why: offline, failing,
    /// waiting (approval, a pause, a slot, the update window) or stuck.
    Laggards {
        /// Only this app's rollout.
        app: Option<AppName>,
    },
    /// Rollouts.
    Rollout {
        #[command(subcommand)]
        action: RolloutAction,
    },
    /// Let a rollout that waits for approval start switching hosts.
    Approve {
        app: AppName,
        /// Refuse if the app's rollout is of another version.
        version: Option<semver::Version>,
        /// Only hosts whose labels match switch, e.g. `role=web,region=eu`; the others keep
        /// what they run.
        #[arg(long = "where", value_name = "SELECTOR")]
        target: Option<Selector>,
    },
    /// Stop handing out rollout slots (hosts already switching finish).
    Pause { app: AppName },
    /// Hand out rollout slots again after a pause.
    Resume { app: AppName },
    /// Stop a rollout for good (hosts already switched stay switched).
    Abort { app: AppName },
    /// What fleetcast did and who asked: releases and their rejections, rollouts and their
    /// outcomes, hosts that rolled back, operators' actions (oldest first).
    History(HistoryArgs),
    /// Move an app (or one ring) back to an earlier stored release: the signer issues a signed
    /// rollback directive and the tracker rolls it out ring by ring.
    Rollback {
        app: AppName,
        #[arg(long)]
        to: semver::Version,
        /// Only this ring.
        #[arg(long)]
        ring: Option<RingName>,
    },
    /// The root of trust: which keys sign releases, rotated without touching agents.
    Root {
        #[command(subcommand)]
        action: RootAction,
    },
    /// Tokens for the tracker's HTTP API and dashboard.
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
    /// List releases and their state.
    Releases {
        #[arg(long)]
        app: Option<AppName>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct PublishArgs {
    /// NAME-VERSION.zip, or any zip with --app and --version.
    archive: PathBuf,
    #[arg(long)]
    app: Option<String>,
    #[arg(long)]
    version: Option<semver::Version>,
    /// Who published it (e.g. the CI job), recorded in the event.
    #[arg(long, env = "FLEETCAST_PUBLISHED_BY")]
    published_by: Option<String>,
    /// Wait until the release is stored or rejected; exit non-zero if rejected.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value = "10m", value_parser = humantime_parse)]
    timeout: Duration,
    /// How long to try reaching NATS before giving up.
    #[arg(long, default_value = "10s", value_parser = humantime_parse)]
    connect_timeout: Duration,
    #[command(flatten)]
    limits: Limits,
}

#[derive(clap::Args)]
struct HistoryArgs {
    /// Only this app's entries.
    app: Option<AppName>,
    /// Only entries of this kind (e.g. `rollout.halted`, `operator.action`).
    #[arg(long)]
    kind: Option<HistoryKind>,
    /// Only entries of this version.
    #[arg(long)]
    version: Option<semver::Version>,
    /// Only entries of this actor (a NATS user, `http:<token>`, a service).
    #[arg(long)]
    actor: Option<String>,
    /// The newest this many (default 100, at most 10,000).
    #[arg(long)]
    limit: Option<usize>,
}

impl From<HistoryArgs> for HistoryQuery {
    fn from(a: HistoryArgs) -> HistoryQuery {
        HistoryQuery {
            app: a.app,
            kind: a.kind,
            version: a.version,
            actor: a.actor,
            limit: a.limit,
        }
    }
}

/// The archive limits `publish` checks locally before uploading: the watcher's `limits.*`
/// (the defaults are the services' defaults; set the same values where the watcher's differ,
/// the watcher's are the ones that count).
#[derive(clap::Args)]
struct Limits {
    /// Most entries an archive may have (the watcher's limits.max_entries).
    #[arg(long, env = "FLEETCAST_LIMITS_MAX_ENTRIES", default_value_t = ArchiveLimits::default().max_entries)]
    limits_max_entries: usize,
    /// Most uncompressed bytes in all (the watcher's limits.max_total_bytes).
    #[arg(long, env = "FLEETCAST_LIMITS_MAX_TOTAL_BYTES", default_value_t = ArchiveLimits::default().max_total_bytes)]
    limits_max_total_bytes: u64,
    /// Highest compression ratio (the watcher's limits.max_ratio).
    #[arg(long, env = "FLEETCAST_LIMITS_MAX_RATIO", default_value_t = ArchiveLimits::default().max_ratio)]
    limits_max_ratio: u64,
}

impl Limits {
    fn archive(&self) -> ArchiveLimits {
        ArchiveLimits {
            max_entries: self.limits_max_entries,
            max_total_bytes: self.limits_max_total_bytes,
            max_ratio: self.limits_max_ratio,
            ..ArchiveLimits::default()
        }
    }
}

#[derive(Subcommand)]
enum RootAction {
    /// Write a new, unsigned root (then each root key holder runs `root sign`).
    New {
        /// Where to write it.
        file: PathBuf,
        /// 1 for the first root; a rotation is the published version plus one.
        #[arg(long, default_value_t = 1)]
        version: u64,
        /// Root key: a public key file or its base64 text (repeat for each).
        #[arg(long = "root-key", required = true)]
        root_keys: Vec<String>,
        #[arg(long, default_value_t = 1)]
        root_threshold: usize,
        /// Release-signing key (the signer's public key; repeat for each).
        #[arg(long = "signing-key", required = true)]
        signing_keys: Vec<String>,
        #[arg(long, default_value_t = 1)]
        signing_threshold: usize,
        /// How long the root stays valid.
        #[arg(long, default_value = "365d", value_parser = humantime_parse)]
        expires_in: Duration,
    },
    /// Add your signature with a root secret key (offline, on the key holder's machine). A
    /// rotation needs the threshold of the old root's keys and of the new one's.
    Sign {
        file: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
    /// Check a root as agents will, against the one published before it, and publish it.
    Publish { file: PathBuf },
    /// Show the newest published root.
    Show,
}

#[derive(Subcommand)]
enum TokenAction {
    /// Make a fresh random token for NAME and print it with the tracker's settings entry that
    /// admits it (only its hash: the settings never hold the token). The history records what
    /// it does as `http:NAME`.
    New {
        name: TokenName,
        /// `operator` may approve, pause, resume, abort and roll back; `read` may only read.
        #[arg(long, value_enum, default_value = "operator")]
        role: Role,
    },
}

/// A token's role, as `token new --role` takes it.
#[derive(Clone, Copy, clap::ValueEnum)]
enum Role {
    Read,
    Operator,
}

impl From<Role> for TokenRole {
    fn from(role: Role) -> TokenRole {
        match role {
            Role::Read => TokenRole::Read,
            Role::Operator => TokenRole::Operator,
        }
    }
}

#[derive(Subcommand)]
enum RolloutAction {
    /// Live progress per ring until the rollout completes (exit 0), halts (exit 3) or is
    /// aborted (exit 4), or, with --version V, V is superseded by a newer release or a
    /// rollback (exit 5) or is not a stored release (exit 6): what CI waits on. Bars on a
    /// terminal; otherwise one plain line per change.
    Watch {
        app: AppName,
        /// Wait for the rollout of this version (e.g. the one CI just published).
        #[arg(long)]
        version: Option<semver::Version>,
    },
}

async fn root(nats: &NatsSettings, action: RootAction) -> anyhow::Result<ExitCode> {
    use cli::root;
    match action {
        RootAction::New {
            file,
            version,
            root_keys,
            root_threshold,
            signing_keys,
            signing_threshold,
            expires_in,
        } => {
            let signed = root::new_root(
                version,
                root::role(&root_keys, root_threshold)?,
                root::role(&signing_keys, signing_threshold)?,
                expires_in,
            )?;
            root::write(&file, &signed)?;
            println!(
                "{}
written to {} (unsigned: each root key holder runs `fleetcast root sign`)",
                root::describe(&signed.unverified()?),
                file.display()
            );
        }
        RootAction::Sign { file, key } => {
            let mut signed = root::read(&file)?;
            let id = root::sign(&mut signed, &key)?;
            root::write(&file, &signed)?;
            println!(
                "signed by {id}; {} signature(s) in {}",
                signed.signatures.len(),
                file.display()
            );
        }
        RootAction::Publish { file } => {
            let signed = root::read(&file)?;
            let bus = cli::connect(nats, CONNECT_TIMEOUT).await?;
            let (newest, published) = root::publish(&bus, &signed).await?;
            let what = if published {
                "published"
            } else {
                "already published; the newest is"
            };
            println!("{what} {}", root::describe(newest.root()));
        }
        RootAction::Show => {
            let bus = cli::connect(nats, CONNECT_TIMEOUT).await?;
            match root::published(&bus).await? {
                Some(root) => println!("{}", root::describe(root.root())),
                None => println!("no root published (verifiers use pinned keys)"),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A duration given on the command line that does not parse (clap prints it with the
/// option's name).
#[derive(Debug, thiserror::Error)]
#[error("{input:?}: {source} (try 90s, 10m or 1h)")]
struct BadDuration {
    input: String,
    source: humantime_serde::re::humantime::DurationError,
}

fn humantime_parse(s: &str) -> Result<Duration, BadDuration> {
    humantime_serde::re::humantime::parse_duration(s).map_err(|source| BadDuration {
        input: s.to_owned(),
        source,
    })
}

/// How long a command tries to reach NATS (`publish` has its own `--connect-timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The whole `fleetcast` command: parses the arguments, runs the command, and says how it
/// ended in its exit code ([`crate::exit`]).
pub fn main() -> ExitCode {
    let args = Args::parse();
    fleetcast_runtime::telemetry::init_tracing_with_default("warn");
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            // A refusal is a verdict on the input, not a failure to act: its own code.
            if e.downcast_ref::<cli::LocalRefusal>().is_some() {
                ExitCode::from(cli::exit::REJECTED)
            } else if e.downcast_ref::<cli::UnknownVersion>().is_some() {
                ExitCode::from(cli::exit::UNKNOWN_VERSION)
            } else {
                ExitCode::from(cli::exit::ERROR)
            }
        }
    }
}

async fn execute(args: Args) -> anyhow::Result<ExitCode> {
    let nats = args.nats();
    match args.command {
        Command::Keygen { dir, name, force } => keygen(&dir, &name, force),
        Command::Publish(publish_args) => publish(&nats, publish_args).await,
        Command::Root { action } => root(&nats, action).await,
        Command::Desire { app, version, ring } => desire(&nats, &app, &ring, &version).await,
        Command::Status => ask(&nats, TrackerCommand::Status, print_status).await,
        Command::Agents { selector } => {
            let print = |r: &Reply| {
                let selected = r
                    .agents
                    .iter()
                    .filter(|a| selector.as_ref().is_none_or(|s| s.matches(&a.labels)));
                print_agents(&selected.collect::<Vec<_>>());
            };
            ask(&nats, TrackerCommand::Status, print).await
        }
        Command::Laggards { app } => {
            let command = TrackerCommand::Laggards { app };
            ask(&nats, command, |r| print_laggards(&r.laggards)).await
        }
        Command::Rollout {
            action: RolloutAction::Watch { app, version },
        } => watch(&nats, &app, version.as_ref()).await,
        Command::History(query) => {
            let command = TrackerCommand::History(query.into());
            ask(&nats, command, print_history).await
        }
        Command::Approve {
            app,
            version,
            target,
        } => {
            let command = TrackerCommand::Approve {
                app,
                version,
                target,
            };
            ask(&nats, command, print_message).await
        }
        Command::Pause { app } => ask(&nats, TrackerCommand::Pause { app }, print_message).await,
        Command::Resume { app } => ask(&nats, TrackerCommand::Resume { app }, print_message).await,
        Command::Abort { app } => ask(&nats, TrackerCommand::Abort { app }, print_message).await,
        Command::Rollback { app, to, ring } => rollback(&nats, &app, &to, ring.as_ref()).await,
        Command::Token {
            action: TokenAction::New { name, role },
        } => new_token(&name, role),
        Command::Releases { app, json } => releases(&nats, app.as_deref(), json).await,
    }
}

/// `fleetcast keygen`: a new key pair in `dir`.
fn keygen(dir: &std::path::Path, name: &str, force: bool) -> anyhow::Result<ExitCode> {
    let (secret, public, id) = cli::keygen(dir, name, force)?;
    println!(
        "key id {id}\nsecret key: {} (keep it secret: a signing key goes to the signer only, a root key stays offline with its holder)\npublic key: {}",
        secret.display(),
        public.display()
    );
    Ok(ExitCode::SUCCESS)
}

async fn desire(
    nats: &NatsSettings,
    app: &AppName,
    ring: &RingName,
    version: &semver::Version,
) -> anyhow::Result<ExitCode> {
    let bus = cli::connect(nats, CONNECT_TIMEOUT).await?;
    cli::desire(&bus, app, ring, version).await?;
    println!("{app} in ring {ring} should now run {version}");
    Ok(ExitCode::SUCCESS)
}

async fn rollback(
    nats: &NatsSettings,
    app: &AppName,
    to: &semver::Version,
    ring: Option<&RingName>,
) -> anyhow::Result<ExitCode> {
    let bus = cli::connect(nats, CONNECT_TIMEOUT).await?;
    let from = cli::request_rollback(&bus, app, to, ring).await?;
    println!(
        "rollback of {app} to {to} (replacing up to {from}) requested; follow it with: fleetcast rollout watch {app} --version {to}"
    );
    Ok(ExitCode::SUCCESS)
}

/// `fleetcast token new`: printed once, with the tracker's settings entry for it.
fn new_token(name: &TokenName, role: Role) -> anyhow::Result<ExitCode> {
    let token = fleetcast_events::tracker::new_token()
        .map_err(|e| anyhow::anyhow!("no randomness for a token: {e}"))?;
    println!(
        "token for {} (give it to its holder; it is shown only now):\n{token}\n\nadd to the tracker's settings:\n{}",
        name.as_str(),
        fleetcast_events::tracker::settings_entry(name, role.into(), &token)
    );
    Ok(ExitCode::SUCCESS)
}

async fn releases(nats: &NatsSettings, app: Option<&str>, json: bool) -> anyhow::Result<ExitCode> {
    let bus = cli::connect(nats, CONNECT_TIMEOUT).await?;
    let records = cli::releases(&bus, app).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&records)?);
    } else if records.is_empty() {
        println!("no releases");
    } else {
        print_records(&records);
    }
    Ok(ExitCode::SUCCESS)
}

/// A tracker's answer that is only its message (approve, pause, resume, abort).
fn print_message(reply: &Reply) {
    println!("{}", reply.message);
}

fn print_history(reply: &Reply) {
    for entry in &reply.history {
        println!("{}", cli::history_line(entry));
    }
}

/// Follows a rollout to its end; the exit code says how it ended (see [`crate::exit`]).
async fn watch(
    nats: &NatsSettings,
    app: &AppName,
    version: Option<&semver::Version>,
) -> anyhow::Result<ExitCode> {
    let bus = cli::connect(nats, CONNECT_TIMEOUT).await?;
    let r = cli::watch_rollout(&bus, app, version).await?;
    let reason = r.reason.clone().unwrap_or_default();
    if let Some(v) = version.filter(|v| **v != r.version) {
        let by = if r.rollback {
            "a rollback to"
        } else {
            "the rollout of"
        };
        println!("{app} {v}: superseded by {by} {}", r.version);
        return Ok(ExitCode::from(cli::exit::SUPERSEDED));
    }
    Ok(match r.phase {
        Phase::Completed => {
            let done: usize = r.rings.iter().map(|ring| ring.done).sum();
            println!("{app} {}: completed on {done} host(s)", r.version);
            if done == 0 {
                // Not a failure (no live host runs the app: nothing to update), but
                // rarely what CI meant; say so where its log shows it.
                eprintln!(
                    "warning: no live host reported {app} {}: check the app name and that its agents are connected (fleetcast agents)",
                    r.version
                );
            }
            ExitCode::SUCCESS
        }
        Phase::Halted => {
            println!("{app} {}: halted: {reason}", r.version);
            ExitCode::from(cli::exit::REJECTED)
        }
        _ => {
            println!("{app} {}: aborted: {reason}", r.version);
            ExitCode::from(cli::exit::ABORTED)
        }
    })
}

/// Asks the tracker `command` and prints its answer with `print`; exit 1 with its message when
/// it refused.
async fn ask(
    nats: &NatsSettings,
    command: TrackerCommand,
    print: impl FnOnce(&Reply),
) -> anyhow::Result<ExitCode> {
    let bus = cli::connect(nats, CONNECT_TIMEOUT).await?;
    let reply = cli::tracker(&bus, &command).await?;
    if !reply.ok {
        eprintln!("error: {}", reply.message);
        return Ok(ExitCode::from(cli::exit::ERROR));
    }
    print(&reply);
    Ok(ExitCode::SUCCESS)
}

/// Uploads and announces a release; with `--wait`, waits for its outcome.
async fn publish(nats: &NatsSettings, args: PublishArgs) -> anyhow::Result<ExitCode> {
    let prepared = cli::prepare_release(
        &args.archive,
        args.app,
        args.version,
        &args.limits.archive(),
    )
    .await?;
    let bus = cli::connect(nats, args.connect_timeout).await?;
    let baseline = cli::outcome_baseline(&bus, &prepared).await?;
    // The same bytes again: the pipeline would only deduplicate them, and the upload
    // would stay behind in the incoming store. That archive's outcome is known.
    if let Some(record) = cli::already_stored(&bus, &prepared, baseline).await? {
        print_records(std::slice::from_ref(&record));
        println!(
            "stored {} {} (this archive, blake3 {}, already was: nothing uploaded)",
            prepared.app, prepared.version, prepared.blake3
        );
        return Ok(ExitCode::SUCCESS);
    }
    let bar = ProgressBar::new(prepared.size);
    bar.set_style(
        ProgressStyle::with_template(
            "uploading {bar:40} {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let progress = |done: u64, _total: u64| bar.set_position(done);
    let event = cli::publish_prepared(&bus, prepared, args.published_by, Some(&progress)).await?;
    bar.finish_and_clear();
    println!(
        "published {} {} ({} bytes, blake3 {})",
        event.app, event.version, event.size, event.blake3
    );
    if !args.wait {
        return Ok(ExitCode::SUCCESS);
    }
    let record = cli::wait_for_archive(&bus, &event, baseline, args.timeout).await?;
    print_records(std::slice::from_ref(&record));
    if record.state == ReleaseState::Stored {
        println!("stored {} {}", event.app, event.version);
        return Ok(ExitCode::SUCCESS);
    }
    let reason = record
        .reason
        .as_ref()
        .map_or_else(|| "no reason recorded".to_string(), ToString::to_string);
    eprintln!(
        "error: {} {} (blake3 {}) was rejected: {reason}",
        event.app, event.version, event.blake3
    );
    Ok(ExitCode::from(cli::exit::REJECTED))
}

fn print_status(reply: &Reply) {
    use std::collections::BTreeMap;
    let mut counts: BTreeMap<(String, String, String), usize> = BTreeMap::new();
    let stale = reply.agents.iter().filter(|a| a.stale).count();
    for row in reply.agents.iter().filter(|a| !a.stale) {
        for (app, view) in &row.apps {
            let version = view
                .running
                .as_ref()
                .map_or("-".to_string(), ToString::to_string);
            *counts
                .entry((app.to_string(), version, row.ring.to_string()))
                .or_default() += 1;
        }
    }
    println!("{} agents ({stale} stale)", reply.agents.len());
    println!(
        "{:<20} {:<16} {:<12} {:>6}",
        "APP", "VERSION", "RING", "AGENTS"
    );
    for ((app, version, ring), n) in counts {
        println!("{app:<20} {version:<16} {ring:<12} {n:>6}");
    }
    for r in &reply.rollouts {
        let phase = fleetcast_runtime::metrics::label_value(&r.phase);
        let paused = if r.paused { " (paused)" } else { "" };
        let target = r
            .target
            .as_ref()
            .map_or(String::new(), |t| format!(", for the hosts where {t}"));
        println!("\nrollout {} {}: {phase}{paused}{target}", r.app, r.version);
        for ring in &r.rings {
            println!(
                "  {:<12} {}/{} done, {} failed, {} switching, {} stale",
                ring.ring, ring.done, ring.targets, ring.failed, ring.switching, ring.stale
            );
        }
        if let Some(reason) = &r.reason {
            println!("  reason: {reason}");
        }
    }
}

fn print_agents(agents: &[&AgentSummary]) {
    // As wide as the longest app name (the agent's own is `fleetcast-agent-linux-x86_64`).
    let app_width = agents
        .iter()
        .flat_map(|a| a.apps.keys())
        .map(|app| app.len())
        .max()
        .unwrap_or(0)
        .max(16);
    println!(
        "{:<20} {:<10} {:<12} {:<app_width$} {:<12} {:<16} {:<28} {:<20}  LAST ERROR",
        "AGENT", "AGENT VER", "RING", "APP", "RUNNING", "STATE", "LAST UPDATE FETCHED", "LABELS"
    );
    let now = time::OffsetDateTime::now_utc();
    for a in agents {
        let stale = if a.stale {
            " (stale)"
        } else if a.metadata.as_ref().is_some_and(|m| m.stale) {
            " (stale metadata)"
        } else {
            ""
        };
        let labels: Vec<String> = a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let labels = if labels.is_empty() {
            "-".to_string()
        } else {
            labels.join(",")
        };
        for (app, view) in &a.apps {
            let running = view
                .running
                .as_ref()
                .map_or("-".to_string(), ToString::to_string);
            let mut state = fleetcast_runtime::metrics::label_value(&view.state);
            if let Some(waiting) = &view.waiting {
                state = format!("{state} ({waiting})");
            }
            let error = view
                .last_error
                .as_ref()
                .map(|e| {
                    let version = e
                        .version
                        .as_ref()
                        .map(ToString::to_string)
                        .unwrap_or_default();
                    // When: an error from a long-past release reads as such.
                    let when = cli::ago(e.at, now);
                    format!("{version}: {} ({when})", e.reason)
                })
                .unwrap_or_default();
            // What the last update cost against what the version weighs: "-" when unknown.
            let fetched = view.last_fetch.as_ref().map_or("-".to_string(), |f| {
                format!(
                    "{} of {} ({})",
                    cli::size(f.bytes.fetched),
                    cli::size(f.bytes.release),
                    f.version
                )
            });
            println!(
                "{:<20} {:<10} {:<12} {app:<app_width$} {running:<12} {:<16} {fetched:<28} {labels:<20}  {error}",
                format!("{}{stale}", a.agent_id),
                // "?": an agent too old to report its own version.
                a.agent_version.as_deref().unwrap_or("?"),
                a.ring,
                state
            );
        }
    }
}

fn print_laggards(laggards: &[Laggard]) {
    if laggards.is_empty() {
        println!("no laggards: every host a rollout reached runs its version or is on its way");
        return;
    }
    println!(
        "{:<20} {:<16} {:<12} {:<12} {:<12} {:<9}  WHY",
        "AGENT", "APP", "RING", "WANTED", "RUNNING", "LAG"
    );
    let now = time::OffsetDateTime::now_utc();
    for l in laggards {
        let why = match &l.lag {
            Lag::Offline { last_seen } => {
                format!("last seen {}", cli::ago(*last_seen, now))
            }
            Lag::Failing { reason } => reason.clone(),
            Lag::Waiting { what } => format!("waiting for {what}"),
            Lag::Stuck { since } => format!(
                "{} since its ring started {}",
                fleetcast_runtime::metrics::label_value(&l.state),
                cli::ago(*since, now)
            ),
        };
        let why = match &l.remediation {
            Some(done) => format!("{why}; {done}"),
            None => why,
        };
        println!(
            "{:<20} {:<16} {:<12} {:<12} {:<12} {:<9}  {why}",
            l.agent_id,
            l.app,
            l.ring,
            l.version.to_string(),
            l.running.as_ref().map_or("-".into(), ToString::to_string),
            l.lag.kind()
        );
    }
}

fn print_records(records: &[ReleaseRecord]) {
    println!(
        "{:<20} {:<16} {:<16} {:<9} {:>6} {:>12} {:>7} {:>7}  NOTE",
        "APP", "VERSION", "ARCHIVE", "STATE", "FILES", "BYTES", "CHUNKS", "NEW"
    );
    for r in records {
        let state = fleetcast_runtime::metrics::label_value(&r.state);
        let (files, bytes, chunks, new) = match &r.stored {
            Some(s) => (
                s.files.to_string(),
                s.total_bytes.to_string(),
                s.chunks.to_string(),
                s.new_chunks.to_string(),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        let note = r
            .reason
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        // The archive by the short hash its object name carries: a version published twice
        // with other content has two rows.
        let archive: String = r
            .blake3
            .as_deref()
            .unwrap_or("-")
            .chars()
            .take(16)
            .collect();
        println!(
            "{:<20} {:<16} {:<16} {:<9} {:>6} {:>12} {:>7} {:>7}  {}",
            r.app,
            r.version.to_string(),
            archive,
            state,
            files,
            bytes,
            chunks,
            new,
            note
        );
    }
}
