//! The one writer of the policy objects' status: each changed `PortcullisPolicy` and
//! `PortcullisClusterPolicy` is checked ([`crate::policy::objects`]) and its `status` replaced
//! when what it says differs — `Accepted`, the rule count, and the generation the agents enforce
//! with its spec.
//!
//! Writes carry the `resourceVersion` of the object checked: if the object changed meanwhile
//! (another replica wrote first, or the user applied a new generation), the API server refuses
//! the write with 409 and the watch brings the newer object, which is checked in its turn. Any
//! other failure is retried after a second.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::{
    Api, Client, Resource,
    api::{PostParams, ResourceExt as _},
};
use serde::{Serialize, de::DeserializeOwned};

use crate::{
    inputs::kube::{ChangedObject, ObjectKey, StatusFeed},
    policy::{
        crd::PolicyStatus,
        objects::{self, FieldError, Fragment},
    },
};

/// Runs until the process ends.
pub async fn run(feed: StatusFeed, client: Client, trust_domain: String) {
    loop {
        feed.wait().await;
        let mut failed = false;
        for obj in feed.take() {
            let key = match &obj {
                ChangedObject::Namespaced(o) => (o.namespace(), o.name_any()),
                ChangedObject::Cluster(o) => (None, o.name_any()),
            };
            let result = match obj {
                ChangedObject::Namespaced(o) => {
                    let ns = o.namespace().unwrap_or_default();
                    let name = o.name_any();
                    let verdict = objects::check_namespaced(&ns, &name, &o.spec, &trust_domain);
                    write(Api::namespaced(client.clone(), &ns), o, verdict).await
                }
                ChangedObject::Cluster(o) => {
                    let verdict = objects::check_cluster(&o.name_any(), &o.spec, &trust_domain);
                    write(Api::all(client.clone()), o, verdict).await
                }
            };
            if let Err(e) = result {
                tracing::warn!(object = %describe(&key), error = %e, "writing a policy object's status failed; retrying");
                feed.requeue(key);
                failed = true;
            }
        }
        if failed {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

fn describe((ns, name): &ObjectKey) -> String {
    match ns {
        Some(ns) => format!("PortcullisPolicy {ns}/{name}"),
        None => format!("PortcullisClusterPolicy {name}"),
    }
}

/// An object of either kind, as far as its status goes.
trait WithStatus: Resource + Clone + Serialize + DeserializeOwned + std::fmt::Debug {
    type Spec: Clone + PartialEq;
    fn parts(&mut self) -> (&Self::Spec, &mut Option<PolicyStatus<Self::Spec>>);
}

impl WithStatus for crate::policy::crd::PortcullisPolicy {
    type Spec = crate::policy::crd::PortcullisPolicySpec;
    fn parts(&mut self) -> (&Self::Spec, &mut Option<PolicyStatus<Self::Spec>>) {
        (&self.spec, &mut self.status)
    }
}

impl WithStatus for crate::policy::crd::PortcullisClusterPolicy {
    type Spec = crate::policy::crd::PortcullisClusterPolicySpec;
    fn parts(&mut self) -> (&Self::Spec, &mut Option<PolicyStatus<Self::Spec>>) {
        (&self.spec, &mut self.status)
    }
}

/// Writes `obj`'s status for `verdict` if it differs from the one it has.
async fn write<K>(
    api: Api<K>,
    mut obj: K,
    verdict: Result<Fragment, FieldError>,
) -> Result<(), kube::Error>
where
    K: WithStatus<DynamicType = ()>,
{
    let generation = obj.meta().generation;
    let name = obj.name_any();
    let what = match obj.meta().namespace.as_deref() {
        Some(ns) => format!("{} {ns}/{name}", K::kind(&())),
        None => format!("{} {name}", K::kind(&())),
    };
    let (spec, status) = obj.parts();
    let new = objects::status(
        generation,
        spec,
        status.as_ref(),
        verdict.as_ref(),
        Timestamp::now(),
    );
    if status.as_ref() == Some(&new) {
        return Ok(());
    }
    match &verdict {
        Ok(f) => {
            tracing::info!(object = %what, generation, rules = f.rules.len(), "policy object accepted");
        }
        Err(e) => {
            tracing::warn!(object = %what, generation, error = %e, "policy object refused");
        }
    }
    *status = Some(new);
    // Only what the status subresource reads is sent.
    obj.meta_mut().managed_fields = None;
    match api
        .replace_status(&name, &PostParams::default(), &obj)
        .await
    {
        Ok(_) => Ok(()),
        // Changed meanwhile, or gone: the watch brings what is there now.
        Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {
            tracing::debug!(object = %what, code = e.code, "status not written: the object changed");
            Ok(())
        }
        Err(e) => Err(e),
    }
}
