//! `portcullis run`: the async wiring. Sockets are bound and tasks started here; every event
//! they produce goes to the core's one task ([`Core`]), which owns all state.

use std::time::Duration;

use anyhow::Context as _;
use portcullis_common::Event;
use tokio::{signal::unix::SignalKind, sync::mpsc};

use crate::{
    admin::{self, Call},
    config::Config,
    core::Core,
    datapath,
    handshake::{self, Record, WriteRequest},
    inputs::{ClusterSource, KubeSource, kube::Changed},
};

/// How long the Kubernetes source may take to list every pod and node at start.
const KUBE_READY_LIMIT: Duration = Duration::from_secs(300);

/// Runs the agent until SIGTERM or SIGINT. Enforcement stays in place after it returns.
pub async fn run(config: Config) -> anyhow::Result<()> {
    tracing::info!(config = ?config, "starting");
    admin::ensure_free(&config.admin_socket)?;
    let (record_tx, mut record_rx) = mpsc::channel::<Record>(1024);
    let (write_tx, mut write_rx) = mpsc::channel::<WriteRequest>(256);
    let (source, changed) = match (&config.cluster_state, &config.kubernetes) {
        (_, Some(k)) => {
            let kube = KubeSource::start(k.clone()).await?;
            tracing::info!(
                source = kube.description(),
                "waiting for the first complete lists of pods and nodes"
            );
            kube.wait_ready(KUBE_READY_LIMIT).await?;
            let changed = kube.changed();
            (ClusterSource::Kube(kube), changed)
        }
        (Some(path), None) => (ClusterSource::file(path.clone()), Changed::default()),
        (None, None) => anyhow::bail!("no source of cluster state configured"),
    };
    let (mut core, channels) = Core::new(config.clone(), record_tx.clone(), source)?;
    core.setup_first_connection()?;
    core.tick();
    if !core.inputs().loaded() {
        anyhow::bail!(
            "no valid cluster state to start from: {}",
            core.inputs().cluster_error().unwrap_or("unknown error")
        );
    }

    if config.identity.is_some() {
        let addr = {
            let index = core.inputs().index();
            let node = index.node(&config.node).with_context(|| {
                format!(
                    "node `{}` is not in cluster state, so it has no handshake address",
                    config.node
                )
            })?;
            let mut addr = node.address;
            if let Some(port) = config.handshake.port {
                addr.set_port(port);
            }
            addr
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening for node sessions on {addr}"))?;
        tracing::info!(%addr, "accepting node sessions");
        let sessions = handshake::Sessions::new(
            core.creds().view().clone(),
            record_tx.clone(),
            write_tx,
            config.handshake.timeout,
        );
        core.use_sessions(sessions.clone());
        tokio::spawn(handshake::serve(
            listener,
            sessions,
            record_tx,
            config.handshake.limits(),
        ));
    } else {
        tracing::warn!(
            "no identity configured: the agent enforces but does not authenticate (auth entries come only from `portcullis auth allow`)"
        );
        drop(write_tx);
    }
    let listener = admin::bind(&config.admin_socket)?;
    let (event_tx, mut event_rx) = mpsc::channel::<Event>(4096);
    tokio::spawn(datapath::read_events(
        channels.events,
        event_tx,
        core.journal().dropped_counter(),
    ));
    if let Some(logger) = channels.logger {
        tokio::spawn(datapath::forward_log(logger));
    }
    let (call_tx, mut call_rx) = mpsc::channel::<Call>(64);
    if let Some(addr) = config.metrics_addr {
        let metrics_listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("serving metrics on {addr}"))?;
        tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
        tokio::spawn(crate::metrics::serve(
            metrics_listener,
            core.metrics(),
            call_tx.clone(),
            core.health(),
        ));
    }
    tokio::spawn(admin::serve(listener, call_tx));
    // Everything that needed more is done: programs loaded and attached, bpffs mounted,
    // sockets bound.
    match crate::caps::drop_all(crate::caps::WORKERS).await {
        Ok(()) => tracing::info!(kept = "CAP_BPF, CAP_NET_ADMIN", "capabilities dropped"),
        Err(e) => tracing::warn!(
            error = %e,
            "cannot drop capabilities; the agent keeps those it was started with"
        ),
    }

    let arrived = core.creds().arrived();
    let mut tick = tokio::time::interval(config.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut term = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(SignalKind::interrupt())?;
    tracing::info!(admin_socket = %config.admin_socket.display(), "ready");
    loop {
        tokio::select! {
            _ = tick.tick() => core.tick(),
            // Kubernetes changes apply at once, not at the next tick.
            () = changed.wait() => core.step(),
            // SVIDs from the issuer are loaded as they arrive.
            () = arrived.wait() => core.tick(),
            Some(ev) = event_rx.recv() => core.on_event(&ev),
            Some(rec) = record_rx.recv() => core.on_record(rec),
            Some((rec, reply)) = write_rx.recv() => {
                // The responder may have given up (its time limit); nothing to do about it.
                let _unanswered = reply.send(core.on_write(&rec));
            }
            Some((req, reply)) = call_rx.recv() => {
                // The requester may have gone away; nothing to do about it.
                let _unanswered = reply.send(core.handle(req));
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!("stopping; programs stay attached and enforcing");
    if let Err(e) = std::fs::remove_file(&config.admin_socket) {
        tracing::warn!(error = %e, path = %config.admin_socket.display(), "could not remove the admin socket");
    }
    Ok(())
}
