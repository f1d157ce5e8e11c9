//! The one writer of the policy objects' status: each changed `PortcullisPolicy` and
//! `PortcullisClusterPolicy` is checked ([`crate::policy::objects`]) and its `status` replaced
//! when what it says differs — `Accepted`, the rule count, and the generation the agents enforce
//! with its spec.
//!
//! Writes carry the `resourceVersion` of the object checked: if the object changed meanwhile
//! (another replica wrote first, or the user applied a new generation), the API server refuses
//! the write with 409 and the watch brings the newer object, which is checked in its turn. Any
//! other failure is retried, after 1 s, then twice as long each time up to a minute.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::{Client, api::PostParams};

use crate::{
    inputs::kube::{ChangedObject, StatusFeed},
    policy::{
        crd::{PolicyResource, key_of, label},
        objects,
    },
};

/// Longest wait between two rounds of failed writes.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Runs until the process ends.
pub async fn run(feed: StatusFeed, client: Client, trust_domain: String) {
    let mut backoff = Duration::from_secs(1);
    loop {
        feed.wait().await;
        let mut failed = false;
        for obj in feed.take() {
            let (key, result) = match obj {
                ChangedObject::Namespaced(o) => write(&client, o, &trust_domain).await,
                ChangedObject::Cluster(o) => write(&client, o, &trust_domain).await,
            };
            if let Err(e) = result {
                match &e {
                    kube::Error::Api(s) if s.code == 403 => {
                        tracing::error!(object = %label(&key), error = %e, "the issuer may not write the policy objects' status: its role needs `update` on their `status` (deploy/issuer.yaml); retrying")
                    }
                    _ => {
                        tracing::warn!(object = %label(&key), error = %e, retry_in_s = backoff.as_secs(), "writing a policy object's status failed; retrying")
                    }
                }
                feed.requeue(key);
                failed = true;
            }
        }
        if failed {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        } else {
            backoff = Duration::from_secs(1);
        }
    }
}

/// Checks `obj` and writes its status if it differs from the one it has; the object's key, and
/// whether the write (if any) failed.
async fn write<K: PolicyResource>(
    client: &Client,
    mut obj: K,
    trust_domain: &str,
) -> (crate::policy::crd::ObjectKey, Result<(), kube::Error>) {
    let key = key_of(obj.meta());
    let generation = obj.meta().generation;
    let verdict = K::check(&key, obj.spec(), trust_domain);
    let new = objects::status(
        generation,
        obj.spec(),
        obj.status(),
        verdict.as_ref(),
        Timestamp::now(),
    );
    if obj.status() == Some(&new) {
        return (key, Ok(()));
    }
    match &verdict {
        Ok(f) => {
            tracing::info!(object = %label(&key), generation, rules = f.rules.len(), "policy object accepted");
        }
        Err(e) => {
            tracing::warn!(object = %label(&key), generation, error = %e, "policy object refused");
        }
    }
    *obj.status_mut() = Some(new);
    // Only what the status subresource reads is sent.
    obj.meta_mut().managed_fields = None;
    let result = match K::api(client.clone(), &key)
        .replace_status(&key.1, &PostParams::default(), &obj)
        .await
    {
        Ok(_) => Ok(()),
        // Changed meanwhile, or gone: the watch brings what is there now.
        Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {
            tracing::debug!(object = %label(&key), code = e.code, "status not written: the object changed");
            Ok(())
        }
        Err(e) => Err(e),
    };
    (key, result)
}
