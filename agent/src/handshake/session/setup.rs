//! Setting a session up: opening one (TLS, the peer's node SVID, its Ready), accepting one.

use super::*;

impl Sessions {
    /// Opens a session to `node`, records the outcome.
    pub(super) async fn open(
        &self,
        view: &Arc<View>,
        node: &Arc<str>,
        timeout: Duration,
    ) -> Result<Arc<Session>, (Reason, Option<String>)> {
        let start = std::time::Instant::now();
        let mut rec = Record::new(Role::Initiator, Stage::Session);
        rec.remote_node = Some(node.to_string());
        let result = match tokio::time::timeout(timeout, self.connect(view, node, &mut rec)).await {
            Ok(r) => r,
            Err(_) => Err(Reason::Timeout),
        };
        rec.took = start.elapsed();
        let outcome = match result {
            Ok(s) => {
                rec.result = Ok(s.peer_not_after);
                self.counts.opened.fetch_add(1, Ordering::Relaxed);
                Ok(s)
            }
            Err(reason) => {
                rec.result = Err(reason);
                Err((reason, rec.detail.clone()))
            }
        };
        let _ = self.records.send(rec).await;
        outcome
    }

    async fn connect(
        &self,
        view: &Arc<View>,
        node: &Arc<str>,
        rec: &mut Record,
    ) -> Result<Arc<Session>, Reason> {
        let creds = view.node_creds.as_ref().ok_or(Reason::NoNodeSvid)?;
        let addr = view
            .directory
            .node_address(node)
            .ok_or(Reason::UnknownPeer)?;
        rec.peer = Some(addr);
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|_| Reason::Unreachable)?;
        let _ = tcp.set_nodelay(true);
        let name = rustls::pki_types::ServerName::try_from(tls::SESSION_SERVER_NAME)
            .map_err(|_| Reason::Internal)?;
        let stream = TlsConnector::from(creds.client.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| {
                let r = tls_failure(rec, &e, Reason::Tls);
                let alert = tls::rustls_error(&e).and_then(|e| match e {
                    rustls::Error::AlertReceived(a) => Some(*a),
                    _ => None,
                });
                if matches!(
                    alert,
                    Some(
                        rustls::AlertDescription::AccessDenied
                            | rustls::AlertDescription::NoApplicationProtocol
                    )
                ) {
                    // A version 1 agent speaks only `portcullis/1`, and finds no workload
                    // address in our server name.
                    rec.detail = Some(format!(
                        "{node} refused the session ({}): a version 1 agent (one TLS handshake per pair) answers so, and should be upgraded; an alert before the session is up is not authenticated, so it may also have been forged on the path",
                        rec.detail.as_deref().unwrap_or("an alert")
                    ));
                    return Reason::Version;
                }
                r
            })?;
        let conn = stream.get_ref().1;
        if conn.alpn_protocol() != Some(tls::ALPN) {
            rec.detail = Some("the peer did not agree to ALPN portcullis/2".to_owned());
            return Err(Reason::Version);
        }
        let certs = conn.peer_certificates().ok_or(Reason::NoCertificate)?;
        let leaf = crate::identity::svid::check_leaf(
            certs.first().ok_or(Reason::NoCertificate)?,
            SystemTime::now(),
        )?;
        let expected = node_id(&view.trust.trust_domain, node).map_err(|_| Reason::Internal)?;
        rec.remote_id = Some(leaf.id.clone());
        if leaf.id != expected {
            rec.detail = Some(format!(
                "the agent at {addr} presented {}, not {expected}",
                leaf.id
            ));
            return Err(Reason::NotANode);
        }
        let binding = Binding::export(conn)?;
        let local_serial = creds.svid.serial.clone();
        let not_after = leaf.not_after;
        let peer_chain = certs.to_vec();
        let mut stream = stream;
        // In TLS 1.3 our side of the handshake is done before the peer has judged our
        // certificate: nothing is sent before its `Ready`, and its refusal (an alert) comes
        // here instead.
        match read_first(&mut stream, rec).await? {
            Message::Ready(r) if r.node == **node => {}
            Message::Ready(r) => {
                rec.detail = Some(format!("{node} said it is {}", r.node));
                return Err(Reason::Protocol);
            }
            _ => {
                rec.detail = Some("the first frame was not Ready".to_owned());
                return Err(Reason::Protocol);
            }
        }
        Ok(self.start(
            tokio_rustls::TlsStream::Client(stream),
            Established {
                peer_node: node.clone(),
                peer_addr: addr,
                peer_not_after: not_after,
                peer_chain,
                trusted_under: view.trust.fingerprint,
                local_serial,
                opened_by_us: true,
                binding,
            },
        ))
    }

    /// Takes a connection a peer opened, after the listener's limits: TLS with node SVIDs,
    /// then the session. Returns the record of the set-up.
    pub(in crate::handshake) async fn accept(&self, tcp: TcpStream, peer: SocketAddr) -> Record {
        let start = std::time::Instant::now();
        let mut rec = Record::new(Role::Responder, Stage::Session);
        rec.peer = Some(peer);
        let result = match tokio::time::timeout(
            self.timeout,
            self.accept_inner(tcp, peer, &mut rec),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(Reason::Timeout),
        };
        rec.result = result;
        rec.took = start.elapsed();
        rec
    }

    async fn accept_inner(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        rec: &mut Record,
    ) -> Result<SystemTime, Reason> {
        let _ = tcp.set_nodelay(true);
        let Some(view) = self.views.borrow().clone() else {
            return Err(Reason::NoNodeSvid);
        };
        let start = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp)
            .await
            .map_err(|e| tls_failure(rec, &e, Reason::Protocol))?;
        let offered: Vec<Vec<u8>> = start
            .client_hello()
            .alpn()
            .map(|a| a.map(<[u8]>::to_vec).collect())
            .unwrap_or_default();
        let creds = view.node_creds.as_ref().ok_or(Reason::NoNodeSvid)?;
        if !offered.iter().any(|a| a == tls::ALPN) {
            rec.detail = Some(if offered.iter().any(|a| a == tls::ALPN_V1) {
                "the peer speaks protocol version 1 (one TLS handshake per pair); upgrade it"
                    .to_owned()
            } else {
                "the peer did not offer ALPN portcullis/2".to_owned()
            });
            if !offered.is_empty() {
                // rustls answers a client whose protocols are all foreign with the
                // `no_application_protocol` alert, so the peer learns why too.
                let _ = start.into_stream(creds.server.clone()).await;
            }
            return Err(Reason::Version);
        }
        let stream = start
            .into_stream(creds.server.clone())
            .await
            .map_err(|e| tls_failure(rec, &e, Reason::Tls))?;
        let conn = stream.get_ref().1;
        let certs = conn.peer_certificates().ok_or(Reason::NoCertificate)?;
        let leaf = crate::identity::svid::check_leaf(
            certs.first().ok_or(Reason::NoCertificate)?,
            SystemTime::now(),
        )?;
        rec.remote_id = Some(leaf.id.clone());
        let Some(node) = node_of(&leaf.id).map(str::to_owned) else {
            rec.detail = Some(format!("{} is not a node SVID", leaf.id));
            return Err(Reason::NotANode);
        };
        rec.remote_node = Some(node.clone());
        if view.directory.node_address(&node).is_none() {
            rec.detail = Some(format!("node {node} is not in cluster state"));
            return Err(Reason::NotANode);
        }
        let binding = Binding::export(conn)?;
        let peer_chain = certs.to_vec();
        let not_after = leaf.not_after;
        let mut stream = stream;
        let ready = Message::Ready(wire::Ready {
            node: view.node.clone(),
        });
        wire::write_all(&mut stream, &[ready])
            .await
            .map_err(|_| Reason::SessionClosed)?;
        let session = self.start(
            tokio_rustls::TlsStream::Server(stream),
            Established {
                peer_node: node.as_str().into(),
                peer_addr: peer,
                peer_not_after: not_after,
                peer_chain,
                trusted_under: view.trust.fingerprint,
                local_serial: creds.svid.serial.clone(),
                opened_by_us: false,
                binding,
            },
        );
        self.counts.accepted.fetch_add(1, Ordering::Relaxed);
        let mut st = self.lock();
        // A peer's new session replaces the one it opened before (a reconnect, a rotation).
        let older: Vec<u64> = st
            .all
            .values()
            .filter(|s| !s.opened_by_us && *s.peer_node == *node)
            .map(|s| s.serial)
            .collect();
        for serial in older {
            if let Some(s) = st.all.get(&serial) {
                s.close();
            }
        }
        if session.is_closed() {
            return Err(Reason::SessionClosed);
        }
        st.all.insert(session.serial, session.clone());
        // Both agents use the session the node of the smaller name opened.
        let ours_usable = st
            .preferred
            .get(node.as_str())
            .and_then(|serial| st.all.get(serial))
            .is_some_and(|p| p.opened_by_us && p.usable(&view));
        if !ours_usable || node.as_str() < view.node.as_str() {
            st.preferred.insert(node.as_str().into(), session.serial);
        }
        Ok(not_after)
    }
}

/// The opener's first read: the acceptor's `Ready`, or its refusal as a TLS alert (recorded
/// with rustls's words; a transport failure like any before the session is up).
async fn read_first<S: AsyncRead + Unpin>(
    stream: &mut S,
    rec: &mut Record,
) -> Result<Message, Reason> {
    use tokio::io::AsyncReadExt as _;
    let len = stream
        .read_u32()
        .await
        .map_err(|e| tls_failure(rec, &e, Reason::SessionClosed))? as usize;
    if !(2..=wire::MAX_FRAME).contains(&len) {
        return Err(Reason::Protocol);
    }
    let mut frame = vec![0; len];
    stream
        .read_exact(&mut frame)
        .await
        .map_err(|e| tls_failure(rec, &e, Reason::SessionClosed))?;
    Message::decode(&frame)
}

/// The reason for a failed TLS handshake, with rustls's own words as the record's detail.
fn tls_failure(rec: &mut Record, e: &std::io::Error, otherwise: Reason) -> Reason {
    match tls::rustls_error(e) {
        Some(err) => {
            rec.detail = Some(err.to_string());
            tls::reason_of(err)
        }
        None => {
            rec.detail = Some(e.to_string());
            otherwise
        }
    }
}
