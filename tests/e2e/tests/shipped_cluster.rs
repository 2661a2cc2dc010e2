//! The shipped production cluster, run: the three nodes of `ops/nats/cluster-node-{1,2,3}.conf`
//! with their shared `ops/nats/cluster-common.conf` as three nats-server processes on loopback
//! (the harness rewrites only ports, stores, route URLs, `client_advertise` and the `./auth/`
//! includes; authentication, TLS and the JetStream domain stay as shipped), with the operator,
//! accounts and TLS material `ops/nats/gen-accounts --tls` issues. The nodes form one
//! JetStream cluster over mutual-TLS routes, a release reaches an agent with every program
//! under its own identity and three replicas, a node can die mid-way, and every node's client
//! port refuses anonymous clients and clients that do not trust the deployment's CA.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use fleetcast_e2e::checks::{
    assert_no_permission_violations, assert_only_verified_clients_admitted,
    own_agent_runs_first_release, tls_connect,
};
use fleetcast_e2e::{Pipeline, REFUSAL, eventually, running, script_app};
use fleetcast_harness::NatsServer;
use fleetcast_harness::accounts::{Accounts, AgentSpec};
use futures::StreamExt;

/// The route port a node listens on, from its rewritten copy of cluster-common.conf (the
/// `listen` of the `cluster` block).
fn route_port(node: &NatsServer) -> u16 {
    let common = std::fs::read_to_string(node.store_dir().join("cluster-common.conf"))
        .expect("the node's cluster-common.conf");
    let mut in_cluster = false;
    for line in common.lines() {
        if line.starts_with("cluster {") {
            in_cluster = true;
        } else if line.starts_with('}') {
            in_cluster = false;
        } else if in_cluster && let Some(addr) = line.trim().strip_prefix("listen: 127.0.0.1:") {
            return addr.parse().expect("port");
        }
    }
    panic!("no cluster listen in {common}");
}

/// The three shipped nodes, running, with the accounts and TLS material they were issued.
async fn shipped_cluster() -> (Accounts, Vec<NatsServer>) {
    let accounts = Accounts::generate_with_tls(&[]).expect("accounts");
    let nodes = NatsServer::start_shipped_cluster(&accounts)
        .await
        .expect("the shipped cluster starts");
    (accounts, nodes)
}

/// What a route port answers a connection from 127.0.0.1: a TLS handshake trusting `ca`,
/// presenting `client` (certificate and key files) if given, then the first line the node
/// sends (its route INFO once it accepted the peer). An error or an empty line: refused.
async fn route_answer(
    port: u16,
    ca: &Path,
    client: Option<(&Path, &Path)>,
) -> std::io::Result<String> {
    use tokio::io::AsyncBufReadExt;

    let tls = tls_connect(port, ca, client).await?;
    let mut line = String::new();
    tokio::time::timeout(REFUSAL, tokio::io::BufReader::new(tls).read_line(&mut line))
        .await
        .map_err(std::io::Error::other)??;
    Ok(line)
}

/// The three shipped nodes form one JetStream cluster: each answers JetStream requests as
/// `admin`, a stream with three replicas created through one node has a replica on each of
/// nats-1, nats-2 and nats-3 (the shipped server names), all current, and a message published
/// through one node is read through another. The routes carrying this require TLS with a
/// client certificate the deployment's CA signed: a node's certificate gets the route INFO, a
/// handshake without one or plain text gets nothing. Each node logged its routes to the other
/// two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_nodes_form_a_jetstream_cluster_over_mutual_tls_routes() {
    let (accounts, nodes) = shipped_cluster().await;
    assert_eq!(nodes.len(), 3);

    let first = async_nats::jetstream::new(
        nodes[0]
            .client_options()
            .connect(nodes[0].url())
            .await
            .expect("admin connects to nats-1"),
    );
    let mut stream = first
        .create_stream(async_nats::jetstream::stream::Config {
            name: "SHIPPED_CLUSTER".into(),
            subjects: vec!["shipped.cluster".into()],
            num_replicas: 3,
            max_bytes: 1 << 20,
            ..Default::default()
        })
        .await
        .expect("an R3 stream");
    first
        .publish("shipped.cluster", "hello".into())
        .await
        .expect("publish")
        .await
        .expect("acked by a quorum");
    let ca = accounts.ca().expect("TLS");
    let mut placed: Vec<String>;
    let deadline = tokio::time::Instant::now() + fleetcast_e2e::TIMEOUT;
    loop {
        let info = stream.info().await.expect("stream info");
        let cluster = info.cluster.clone().expect("clustered");
        placed = std::iter::once(cluster.leader.clone().unwrap_or_default())
            .chain(
                cluster
                    .replicas
                    .iter()
                    .filter(|r| r.current)
                    .map(|r| r.name.clone()),
            )
            .collect::<Vec<_>>();
        placed.sort();
        if placed == ["nats-1", "nats-2", "nats-3"] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stream's replicas: {cluster:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(placed, ["nats-1", "nats-2", "nats-3"]);

    for (i, node) in nodes.iter().enumerate() {
        let js = async_nats::jetstream::new(
            node.client_options()
                .connect(node.url())
                .await
                .expect("admin connects"),
        );
        let mut s = js.get_stream("SHIPPED_CLUSTER").await.expect("stream");
        assert_eq!(
            s.info().await.expect("info").state.messages,
            1,
            "node {i} sees the message"
        );
        // The route port: a peer with a certificate the deployment's CA signed (the nodes'
        // own) is answered with the route INFO; the same handshake without a client
        // certificate, or no TLS at all, gets nothing.
        let port = route_port(node);
        let tls = accounts.dir().join("tls");
        let peer = route_answer(
            port,
            &ca,
            Some((&tls.join("server.pem"), &tls.join("server-key.pem"))),
        )
        .await
        .expect("a node's certificate is accepted on the route port");
        assert!(
            peer.starts_with("INFO ") && peer.contains("\"cluster\":\"fleetcast\""),
            "node {i}: {peer}"
        );
        let anonymous = route_answer(port, &ca, None).await;
        assert!(
            anonymous.as_ref().is_ok_and(|l| !l.contains("INFO")) || anonymous.is_err(),
            "node {i} answered a route peer without a certificate: {anonymous:?}"
        );
        // Refused by the node itself, for want of a certificate.
        eventually(&format!("node {i} logs the route peer refused"), || {
            node.log()
                .contains("TLS route handshake error: tls: client didn't provide a certificate")
        })
        .await;
        let mut plain = String::new();
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("route port");
        stream.set_read_timeout(Some(REFUSAL)).expect("timeout");
        let _ = BufReader::new(stream).read_line(&mut plain);
        assert!(
            !plain.contains("INFO"),
            "node {i} answered in plain text: {plain}"
        );
        let log = node.log();
        assert!(
            log.matches("Route connection created").count() >= 2,
            "node {i} routed to the two others: {log}"
        );
    }
}

/// An anonymous client (over TLS, and in plain text) and a client with valid credentials that
/// does not trust the deployment's CA are refused at every node's client port; the same
/// credentials with the CA are admitted at each (so the refusals are the servers').
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shipped_node_refuses_anonymous_and_unverified_clients() {
    let (accounts, nodes) = shipped_cluster().await;
    let ca = accounts.ca().expect("TLS");
    let ci = accounts.creds("ci");
    for (i, node) in nodes.iter().enumerate() {
        assert_only_verified_clients_admitted(node, &ca, &ci, &format!("node {i}")).await;
    }
}

/// A release flows end to end on the shipped cluster: the watcher, signer, distributor and
/// tracker each under its own role's identity, an agent under its own, every stream and
/// bucket with three replicas. Then one node is killed (SIGKILL) and the next release still
/// reaches the agent through the two left. No server logged a permission violation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_flows_on_the_shipped_cluster_and_survives_a_node_dying() {
    let mut p = Pipeline::new_closed_cluster(&[AgentSpec::new("h1", "default", &["shapp"])])
        .await
        .expect("pipeline");
    assert_eq!(p.nats_settings().replicas, 3);
    p.start_pipeline_as_roles();
    p.start_tracker_as_role(p.tracker_settings());
    let (_host, state) = own_agent_runs_first_release(&mut p, "h1", "default").await;

    // Every stream (buckets included) the services created has a replica on each node.
    let admin = async_nats::jetstream::new(
        p.nats
            .client_options()
            .connect(p.nats.url())
            .await
            .expect("admin"),
    );
    let names: Vec<String> = admin
        .stream_names()
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .expect("stream names");
    assert!(!names.is_empty());
    for name in &names {
        let mut stream = admin.get_stream(name).await.expect("stream");
        let info = stream.info().await.expect("info");
        assert_eq!(info.config.num_replicas, 3, "{name}");
    }
    drop(admin);

    // Node 2 dies; the two others keep their quorum and the next release goes through.
    p.cluster[0].stop();
    p.release("shapp", "1.1.0", &script_app("1.1.0", true))
        .await;
    eventually("h1 runs 1.1.0 with a node down", || {
        running(&state) == "1.1.0"
    })
    .await;

    for node in std::iter::once(&p.nats).chain(&p.cluster) {
        assert_no_permission_violations(node);
    }
}
