//! The Kubernetes attestor: an agent's projected service-account token (audience
//! `portcullis-issuer`, bound to the agent's pod) is checked with a TokenReview, and the node
//! is the one the review names (`authentication.kubernetes.io/node-name`), checked against the
//! bound pod's `spec.nodeName` (the only source on clusters whose tokens do not carry the node).

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::Pod,
};
use kube::api::{Api, PostParams};

use super::protocol::{Code, Refusal};

const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const NODE_NAME: &str = "authentication.kubernetes.io/node-name";

fn refused(reason: impl Into<String>) -> Refusal {
    Refusal::new(Code::TokenReview, reason)
}

/// The node of the agent whose token this is, or why the token is refused.
pub async fn node_of_token(
    client: &kube::Client,
    token: &str,
    audience: &str,
    (namespace, account): &(String, String),
) -> Result<String, Refusal> {
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_owned()),
            audiences: Some(vec![audience.to_owned()]),
        },
        ..TokenReview::default()
    };
    let out = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| Refusal::new(Code::Internal, format!("TokenReview failed: {e}")))?;
    let status = out
        .status
        .ok_or_else(|| refused("the TokenReview came back without a status"))?;
    if status.authenticated != Some(true) {
        return Err(refused(format!(
            "the API server did not authenticate the token: {}",
            status.error.as_deref().unwrap_or("no reason given")
        )));
    }
    if !status
        .audiences
        .as_ref()
        .is_some_and(|a| a.iter().any(|x| x == audience))
    {
        return Err(refused(format!(
            "the token is not for audience `{audience}` (its audiences: {:?})",
            status.audiences.unwrap_or_default()
        )));
    }
    let user = status
        .user
        .ok_or_else(|| refused("the TokenReview names no user"))?;
    let expected = format!("system:serviceaccount:{namespace}:{account}");
    let username = user.username.unwrap_or_default();
    if username != expected {
        return Err(refused(format!(
            "the token is of `{username}`, not of the agents' service account `{expected}`"
        )));
    }
    let extra = user.extra.unwrap_or_default();
    let one = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
    let pod_name = one(POD_NAME)
        .ok_or_else(|| refused("the token is not bound to a pod (no pod-name in the review)"))?;
    let pod_uid = one(POD_UID)
        .ok_or_else(|| refused("the token is not bound to a pod uid (not a bound token)"))?;
    let pod = Api::<Pod>::namespaced(client.clone(), namespace)
        .get_opt(&pod_name)
        .await
        .map_err(|e| {
            Refusal::new(
                Code::Internal,
                format!("reading pod {namespace}/{pod_name}: {e}"),
            )
        })?
        .ok_or_else(|| {
            refused(format!(
                "the token's pod {namespace}/{pod_name} does not exist"
            ))
        })?;
    if pod.metadata.uid.as_deref() != Some(pod_uid.as_str()) {
        return Err(refused(format!(
            "the token's pod {namespace}/{pod_name} was replaced (uid {}, token bound to {pod_uid})",
            pod.metadata.uid.as_deref().unwrap_or("none")
        )));
    }
    if pod.metadata.deletion_timestamp.is_some() {
        return Err(refused(format!(
            "the token's pod {namespace}/{pod_name} is being deleted"
        )));
    }
    if let Some(phase @ ("Succeeded" | "Failed")) =
        pod.status.as_ref().and_then(|s| s.phase.as_deref())
    {
        return Err(refused(format!(
            "the token's pod {namespace}/{pod_name} has finished ({phase})"
        )));
    }
    let pod_node = pod.spec.and_then(|s| s.node_name).ok_or_else(|| {
        refused(format!(
            "the token's pod {namespace}/{pod_name} is not scheduled"
        ))
    })?;
    match one(NODE_NAME) {
        Some(node) if node != pod_node => Err(refused(format!(
            "the token names node `{node}`, but its pod {namespace}/{pod_name} runs on `{pod_node}`"
        ))),
        _ => Ok(pod_node),
    }
}
