//! Each session's reader and writer tasks.

use super::*;

pub(super) async fn write_loop<W: AsyncRead + AsyncWrite + Unpin>(
    mut wr: WriteHalf<W>,
    mut outbox: mpsc::Receiver<Message>,
    mut closed: watch::Receiver<bool>,
) {
    let mut batch = Vec::with_capacity(64);
    loop {
        tokio::select! {
            n = outbox.recv_many(&mut batch, 64) => {
                if n == 0 {
                    break;
                }
                // A peer that stops reading must not hold the session once it is closed.
                let written = tokio::select! {
                    w = wire::write_all(&mut wr, &batch) => w.is_ok(),
                    () = closing(&mut closed) => false,
                };
                if !written {
                    break;
                }
                batch.clear();
            }
            () = closing(&mut closed) => break,
        }
    }
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        tokio::io::AsyncWriteExt::shutdown(&mut wr),
    )
    .await;
}

pub(super) async fn read_loop<R: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    me: Weak<Sessions>,
    session: Arc<Session>,
    mut rd: ReadHalf<R>,
    mut closed: watch::Receiver<bool>,
) {
    loop {
        let msg = tokio::select! {
            m = wire::read_msg(&mut rd) => m,
            () = closing(&mut closed) => break,
        };
        let msg = match msg {
            Ok(m) => m,
            Err(Reason::SessionClosed) => break,
            Err(reason) => {
                // A peer that breaks the framing loses its session, on record.
                if let Some(sessions) = me.upgrade() {
                    let role = if session.opened_by_us {
                        Role::Initiator
                    } else {
                        Role::Responder
                    };
                    let mut rec = Record::new(role, Stage::Session);
                    rec.peer = Some(session.peer_addr);
                    rec.remote_node = Some(session.peer_node.to_string());
                    rec.result = Err(reason);
                    rec.detail = Some("a malformed frame; the session is closed".to_owned());
                    let _ = sessions.records.send(rec).await;
                }
                break;
            }
        };
        session
            .last_rx_ms
            .store(session.since_born(), Ordering::Relaxed);
        let Some(sessions) = me.upgrade() else { break };
        match msg {
            Message::Prove(p) => {
                session.touch();
                let Ok(permit) = session.proofs.clone().try_acquire_owned() else {
                    let id = p.id;
                    // A peer that sends proofs faster than it reads answers loses its session.
                    if session
                        .out
                        .try_send(Message::Refuse(Refuse {
                            id,
                            reason: Reason::Busy,
                        }))
                        .is_err()
                    {
                        break;
                    }
                    continue;
                };
                let s = session.clone();
                tokio::spawn(async move {
                    sessions.answer(s, p).await;
                    drop(permit);
                });
            }
            Message::Proven(p) => {
                if let Some(tx) = session.lock_pending().remove(&p.id) {
                    let _ = tx.send(Answer::Proven(p));
                }
            }
            Message::Refuse(r) => {
                if let Some(tx) = session.lock_pending().remove(&r.id) {
                    let _ = tx.send(Answer::Refused(r.reason));
                }
            }
            Message::Reject(r) => sessions.rejected(&session, r).await,
            // Only the acceptor's first frame, read before the session started.
            Message::Ready(_) => {}
        }
    }
    if let Some(sessions) = me.upgrade() {
        sessions.ended(&session);
    }
}

/// Resolves once the session is closed.
pub(super) async fn closing(closed: &mut watch::Receiver<bool>) {
    let _ = closed.wait_for(|c| *c).await.map(drop);
}
