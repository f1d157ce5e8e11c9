//! The checks of the policy objects (what their schema cannot catch), the status the issuer
//! writes back, and the merge of every accepted object into one [`Policy`].
//!
//! Merge (documented in `docs/POLICY.md`):
//! - Defaults and enrollment come from the `PortcullisClusterPolicy` named `default` (built-in
//!   defaults without it). Other cluster objects hold rules only.
//! - A namespace's settings come from its `PortcullisPolicy` named `default`, field by field
//!   over the cluster defaults. Other objects of the namespace hold rules only.
//! - Rules are the union of every object's: a destination some rule selects accepts only what
//!   the rules selecting it allow, whichever objects they come from. A namespaced object's
//!   rules select destinations in its own namespace only, so a team owning one namespace's
//!   objects cannot open or close another's.

use std::{collections::BTreeMap, fmt};

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use portcullis_common::{IPPROTO_TCP, IPPROTO_UDP, PortRange};

use super::{
    Enroll, Pattern, Policy, Rule, Settings,
    crd::{
        Allowance, Decoded, EnrollSpec, ObjectKey, Passage, PolicyResource, PolicyStatus, PortSpec,
        PortcullisClusterPolicy, PortcullisClusterPolicySpec, PortcullisPolicy,
        PortcullisPolicySpec, Protocol, RuleSpec, SettingsSpec, label,
    },
    rule_ports, valid_namespace,
};

/// The object that holds settings (and, for the cluster, enrollment).
pub const SETTINGS_OBJECT: &str = "default";

/// The settings' fields, as the objects name them.
pub(super) const SETTINGS_FIELDS: [&str; 5] = [
    "mode",
    "nodeTraffic",
    "otherProtocols",
    "synMac",
    "crossNodeUdp",
];

/// The condition type the issuer writes.
pub const ACCEPTED: &str = "Accepted";

/// What is wrong with an object: the field (`spec.rules[0].to[1]`) and why, naming the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub(super) fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// One accepted object, checked: its part of the policy.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fragment {
    pub settings: SettingsSpec,
    pub enroll: Option<Enroll>,
    pub rules: Vec<Rule>,
}

/// Checks a `PortcullisPolicy` of namespace `ns` named `name`.
pub fn check_namespaced(
    ns: &str,
    name: &str,
    spec: &PortcullisPolicySpec,
    trust_domain: &str,
) -> Result<Fragment, FieldError> {
    settings_only_in_default(name, &spec.settings, "PortcullisPolicy", "the namespace's")?;
    let scope = Scope::Namespace {
        prefix: format!("spiffe://{trust_domain}/ns/{ns}/"),
        ns,
    };
    Ok(Fragment {
        settings: spec.settings.clone(),
        enroll: None,
        rules: rules(
            &spec.rules,
            &label(&(Some(ns.to_owned()), name.to_owned())),
            &scope,
            trust_domain,
        )?,
    })
}

/// Checks a `PortcullisClusterPolicy` named `name`.
pub fn check_cluster(
    name: &str,
    spec: &PortcullisClusterPolicySpec,
    trust_domain: &str,
) -> Result<Fragment, FieldError> {
    settings_only_in_default(
        name,
        &spec.settings,
        "PortcullisClusterPolicy",
        "the default",
    )?;
    if name != SETTINGS_OBJECT && spec.enroll.is_some() {
        return Err(FieldError::new(
            "spec.enroll",
            format!(
                "only the PortcullisClusterPolicy named `{SETTINGS_OBJECT}` sets enrollment; `{name}` may hold rules only"
            ),
        ));
    }
    let enroll = spec
        .enroll
        .as_ref()
        .map(|e| enroll(e, trust_domain))
        .transpose()?;
    Ok(Fragment {
        settings: spec.settings.clone(),
        enroll,
        rules: rules(
            &spec.rules,
            &label(&(None, name.to_owned())),
            &Scope::Cluster,
            trust_domain,
        )?,
    })
}

fn settings_only_in_default(
    name: &str,
    s: &SettingsSpec,
    kind: &str,
    whose: &str,
) -> Result<(), FieldError> {
    if name == SETTINGS_OBJECT || s.is_empty() {
        return Ok(());
    }
    let field = [
        ("mode", s.mode.is_some()),
        ("nodeTraffic", s.node_traffic.is_some()),
        ("otherProtocols", s.other_protocols.is_some()),
        ("synMac", s.syn_mac.is_some()),
        ("crossNodeUdp", s.cross_node_udp.is_some()),
    ]
    .into_iter()
    .find(|(_, set)| *set)
    .map_or("mode", |(f, _)| f);
    Err(FieldError::new(
        format!("spec.{field}"),
        format!(
            "only the {kind} named `{SETTINGS_OBJECT}` sets {whose} settings; `{name}` may hold rules only"
        ),
    ))
}

fn enroll(e: &EnrollSpec, trust_domain: &str) -> Result<Enroll, FieldError> {
    for (i, ns) in e.namespaces.iter().enumerate() {
        if !valid_namespace(ns) {
            return Err(FieldError::new(
                format!("spec.enroll.namespaces[{i}]"),
                format!(
                    "`{ns}` is not a namespace name (lowercase letters, digits and `-`, at most 63)"
                ),
            ));
        }
    }
    Ok(Enroll {
        namespaces: e.namespaces.clone(),
        workloads: patterns(&e.workloads, "spec.enroll.workloads", trust_domain)?,
    })
}

enum Scope<'a> {
    Cluster,
    /// Destinations must start with `prefix` (`spiffe://td/ns/<ns>/`).
    Namespace {
        prefix: String,
        ns: &'a str,
    },
}

fn patterns(list: &[String], field: &str, trust_domain: &str) -> Result<Vec<Pattern>, FieldError> {
    list.iter()
        .enumerate()
        .map(|(i, s)| {
            let field = format!("{field}[{i}]");
            let p = Pattern::parse(s).map_err(|e| FieldError::new(&field, e))?;
            let own = format!("spiffe://{trust_domain}/");
            let of_domain = match &p {
                Pattern::Any => true,
                Pattern::Exact(s) | Pattern::Prefix(s) => s.starts_with(&own),
            };
            if !of_domain {
                return Err(FieldError::new(
                    field,
                    format!("`{s}` is not of the trust domain `{trust_domain}`"),
                ));
            }
            Ok(p)
        })
        .collect()
}

fn rules(
    list: &[RuleSpec],
    owner: &str,
    scope: &Scope<'_>,
    trust_domain: &str,
) -> Result<Vec<Rule>, FieldError> {
    let mut out = Vec::with_capacity(list.len());
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, r) in list.iter().enumerate() {
        let field = |f: &str| format!("spec.rules[{i}].{f}");
        let name = match r.name.as_deref() {
            Some(n) if n.trim().is_empty() => {
                return Err(FieldError::new(field("name"), "must not be empty"));
            }
            Some(n) => {
                if let Some(prev) = names.insert(n, i) {
                    return Err(FieldError::new(
                        field("name"),
                        format!("rule `{n}` is also spec.rules[{prev}]"),
                    ));
                }
                n.to_owned()
            }
            None => format!("rules[{i}]"),
        };
        if r.from.is_empty() {
            return Err(FieldError::new(
                field("from"),
                "a rule needs at least one source (`*` for any)",
            ));
        }
        let from = patterns(&r.from, &field("from"), trust_domain)?;
        let to = match scope {
            Scope::Cluster => {
                if r.to.is_empty() {
                    return Err(FieldError::new(
                        field("to"),
                        "a cluster rule needs at least one destination (`*` for every workload)",
                    ));
                }
                patterns(&r.to, &field("to"), trust_domain)?
            }
            Scope::Namespace { prefix, ns } => {
                // `*` (or no `to`) is the whole namespace; every other entry is checked, and
                // must lie inside it.
                let to = patterns(&r.to, &field("to"), trust_domain)?;
                for (j, p) in to.iter().enumerate() {
                    let inside = match p {
                        Pattern::Any => true,
                        Pattern::Exact(s) | Pattern::Prefix(s) => s.starts_with(prefix.as_str()),
                    };
                    if !inside {
                        return Err(FieldError::new(
                            field(&format!("to[{j}]")),
                            format!(
                                "`{}` is outside namespace `{ns}`: a PortcullisPolicy selects destinations in its own namespace (a PortcullisClusterPolicy selects any)",
                                r.to[j]
                            ),
                        ));
                    }
                }
                if to.is_empty() || to.contains(&Pattern::Any) {
                    vec![Pattern::Prefix(prefix.clone())]
                } else {
                    to
                }
            }
        };
        let ports = match &r.ports {
            None => None,
            Some(list) => Some(ports(list, &field("ports"))?),
        };
        out.push(Rule {
            name: format!("{owner}#{name}"),
            from,
            to,
            ports,
        });
    }
    Ok(out)
}

fn ports(list: &[PortSpec], field: &str) -> Result<Vec<PortRange>, FieldError> {
    let mut out = Vec::with_capacity(list.len());
    for (j, p) in list.iter().enumerate() {
        let at = format!("{field}[{j}]");
        let port = |v: i32, f: &str| {
            u16::try_from(v).ok().filter(|p| *p > 0).ok_or_else(|| {
                FieldError::new(
                    format!("{at}.{f}"),
                    format!("`{v}` is not a port (1-65535)"),
                )
            })
        };
        let first = port(p.port, "port")?;
        let last = p.end_port.map_or(Ok(first), |e| port(e, "endPort"))?;
        if last < first {
            return Err(FieldError::new(
                format!("{at}.endPort"),
                format!(
                    "the range {first}-{last} is empty: `endPort` {last} is below `port` {first}"
                ),
            ));
        }
        out.push(PortRange {
            first,
            last,
            proto: match p.protocol {
                Some(Protocol::Tcp) => IPPROTO_TCP,
                Some(Protocol::Udp) => IPPROTO_UDP,
                Some(Protocol::Any) | None => 0,
            },
            _pad: [0; 3],
        });
    }
    rule_ports(out).map_err(|e| FieldError::new(field, e))
}

/// `base` with the fields `s` sets.
#[must_use]
pub fn layered(base: Settings, s: &SettingsSpec) -> Settings {
    Settings {
        mode: s.mode.map_or(base.mode, Into::into),
        node_traffic: s
            .node_traffic
            .map_or(base.node_traffic, |a| a == Allowance::Allow),
        other_protocols: s
            .other_protocols
            .map_or(base.other_protocols, |p| p == Passage::Pass),
        syn_mac: s.syn_mac.map_or(base.syn_mac, Into::into),
        cross_node_udp: s
            .cross_node_udp
            .map_or(base.cross_node_udp, |a| a == Allowance::Allow),
    }
}

/// What the policy is called when it is made of objects (named in denials).
pub const POLICY_NAME: &str = "custom resources";

/// The policy made of the accepted objects: cluster objects by name, namespaced ones by
/// (namespace, name).
#[must_use]
pub fn assemble(
    cluster: &BTreeMap<String, Fragment>,
    namespaced: &BTreeMap<(String, String), Fragment>,
) -> Policy {
    let top = cluster.get(SETTINGS_OBJECT);
    let defaults = top.map_or_else(Settings::default, |f| {
        layered(Settings::default(), &f.settings)
    });
    let namespaces = namespaced
        .iter()
        .filter(|((_, name), f)| name == SETTINGS_OBJECT && !f.settings.is_empty())
        .map(|((ns, _), f)| (ns.clone(), layered(defaults, &f.settings)))
        .collect();
    let rules = cluster
        .values()
        .chain(namespaced.values())
        .flat_map(|f| f.rules.iter().cloned())
        .collect();
    Policy {
        name: POLICY_NAME.to_owned(),
        defaults,
        namespaces,
        enroll: top.and_then(|f| f.enroll.clone()),
        rules,
    }
}

/// The policy objects as the API server has them, status included, by namespace and name.
#[derive(Debug, Clone, Default)]
pub struct PolicyObjects {
    pub namespaced: BTreeMap<ObjectKey, Decoded<PortcullisPolicy>>,
    pub cluster: BTreeMap<ObjectKey, Decoded<PortcullisClusterPolicy>>,
}

/// The policy the agents enforce, and what it is made of.
#[derive(Debug, Default)]
pub struct Assembled {
    pub policy: Policy,
    /// The objects in force, with their generations: `pcp shop/api gen 2`.
    pub in_force: Vec<String>,
    /// Objects whose current generation the issuer has not checked yet.
    pub pending: Vec<String>,
    /// Objects whose current generation the issuer refused (an earlier one may be in force).
    pub refused: Vec<String>,
    /// Objects this agent cannot use, with why: it cannot decode them (a newer definition), or
    /// their accepted spec fails its own check (an issuer of another version). While there are
    /// any, the policy in force stays: leaving one out could open what its rules close.
    pub unusable: Vec<String>,
}

impl Assembled {
    /// For the status: what is in force, what waits, what was refused.
    #[must_use]
    pub fn describe(&self) -> String {
        let list = |v: &[String]| {
            if v.is_empty() {
                "none".to_owned()
            } else {
                v.join(", ")
            }
        };
        format!(
            "in force: {}; awaiting acceptance: {}; refused: {}",
            list(&self.in_force),
            list(&self.pending),
            list(&self.refused)
        )
    }

    /// Adds the objects of one kind; returns their fragments.
    fn add<K: PolicyResource>(
        &mut self,
        objects: &PolicyObjects,
        trust_domain: &str,
    ) -> BTreeMap<ObjectKey, Fragment> {
        let generation = |g: Option<i64>| g.map_or_else(|| "?".to_owned(), |g| g.to_string());
        let mut out = BTreeMap::new();
        for (key, d) in K::stored(objects) {
            let label = label(key);
            let o = match &d.object {
                Ok(o) => o,
                Err(e) => {
                    self.unusable.push(format!("{label}: cannot be read: {e}"));
                    continue;
                }
            };
            let current = d.meta.generation;
            let status = o.status();
            let accepted = status.and_then(|s| s.accepted_generation);
            if accepted != current {
                let refused = status.is_some_and(|s| {
                    s.observed_generation == current
                        && s.conditions
                            .iter()
                            .any(|c| c.type_ == ACCEPTED && c.status == "False")
                });
                let line = format!("{label} gen {}", generation(current));
                if refused {
                    self.refused.push(line);
                } else {
                    self.pending.push(line);
                }
            }
            let Some(spec) = status.and_then(|s| s.accepted_spec.as_ref()) else {
                continue;
            };
            match K::check(key, spec, trust_domain) {
                Ok(f) => {
                    self.in_force
                        .push(format!("{label} gen {}", generation(accepted)));
                    out.insert(key.clone(), f);
                }
                Err(e) => self.unusable.push(format!(
                    "{label} gen {}: its accepted spec fails this agent's check: {e}",
                    generation(accepted)
                )),
            }
        }
        out
    }
}

/// The policy the agents enforce: every object's accepted generation (`status.acceptedSpec`),
/// checked again here, merged. Objects the issuer has not accepted are not in it.
#[must_use]
pub fn from_objects(objects: &PolicyObjects, trust_domain: &str) -> Assembled {
    let mut out = Assembled::default();
    let cluster = out
        .add::<PortcullisClusterPolicy>(objects, trust_domain)
        .into_iter()
        .map(|((_, name), f)| (name, f))
        .collect();
    let namespaced = out
        .add::<PortcullisPolicy>(objects, trust_domain)
        .into_iter()
        .map(|((ns, name), f)| ((ns.unwrap_or_default(), name), f))
        .collect();
    out.policy = assemble(&cluster, &namespaced);
    out
}

/// The status the issuer writes for generation `generation` of an object whose check gave
/// `verdict`, given the status it has (`old`): accepted, it becomes the generation in force;
/// refused, the generation in force stays the old one. The condition's transition time moves
/// only when its status changes.
#[must_use]
pub fn status<S: Clone>(
    generation: Option<i64>,
    spec: &S,
    old: Option<&PolicyStatus<S>>,
    verdict: Result<&Fragment, &FieldError>,
    now: Timestamp,
) -> PolicyStatus<S> {
    let old_accepted = old.and_then(|o| o.conditions.iter().find(|c| c.type_ == ACCEPTED));
    let (state, reason, message, rules, accepted_generation, accepted_spec) = match verdict {
        Ok(f) => (
            "True",
            "Accepted",
            format!("{} rules in force", f.rules.len()),
            Some(i32::try_from(f.rules.len()).unwrap_or(i32::MAX)),
            generation,
            Some(spec.clone()),
        ),
        Err(e) => {
            let kept = old.and_then(|o| o.accepted_generation);
            let keeps = match kept {
                Some(g) => format!("the agents keep generation {g}"),
                None => "no generation of this object is in force".to_owned(),
            };
            (
                "False",
                "Invalid",
                format!("{e}; {keeps}"),
                old.and_then(|o| o.rules),
                kept,
                old.and_then(|o| o.accepted_spec.clone()),
            )
        }
    };
    let last_transition_time = match old_accepted {
        Some(c) if c.status == state => c.last_transition_time.clone(),
        _ => Time(now),
    };
    PolicyStatus {
        observed_generation: generation,
        conditions: vec![Condition {
            type_: ACCEPTED.to_owned(),
            status: state.to_owned(),
            reason: reason.to_owned(),
            message,
            observed_generation: generation,
            last_transition_time,
        }],
        rules,
        accepted_generation,
        accepted_spec,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        identity::SpiffeId,
        policy::{Grant, MacMode, Mode},
    };

    const TD: &str = "cluster.local";

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(&format!("spiffe://{TD}/{s}")).unwrap()
    }

    fn ns_spec(yaml: &str) -> PortcullisPolicySpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn cluster_spec(yaml: &str) -> PortcullisClusterPolicySpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn ns_err(ns: &str, name: &str, yaml: &str) -> FieldError {
        check_namespaced(ns, name, &ns_spec(yaml), TD).unwrap_err()
    }

    #[test]
    fn errors_the_schema_cannot_catch_name_the_field_and_value() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "rules: [{from: [\"spiffe://cluster.local/ns/*/sa/x\"]}]",
                "spec.rules[0].from[0]",
                "last path segment",
            ),
            ("rules: [{from: [web]}]", "spec.rules[0].from[0]", "`web`"),
            (
                "rules: [{from: [\"spiffe://cluster.locl/ns/web/*\"]}]",
                "spec.rules[0].from[0]",
                "not of the trust domain `cluster.local`",
            ),
            (
                "rules: [{from: [\"*\"], to: [\"spiffe://cluster.local/ns/other/sa/db\"]}]",
                "spec.rules[0].to[0]",
                "`spiffe://cluster.local/ns/other/sa/db` is outside namespace `shop`",
            ),
            (
                "rules: [{from: [\"*\"], to: [\"*\", \"spiffe://cluster.local/ns/other/*\"]}]",
                "spec.rules[0].to[1]",
                "is outside namespace `shop`",
            ),
            (
                "rules: [{from: [\"*\"], ports: [{port: 9100, endPort: 9000}]}]",
                "spec.rules[0].ports[0].endPort",
                "9100-9000 is empty",
            ),
            (
                "rules: [{from: [\"*\"], ports: []}]",
                "spec.rules[0].ports",
                "empty port list",
            ),
            (
                "rules: [{from: [\"*\"], ports: [{port: 1}, {port: 3}, {port: 5}, {port: 7}, {port: 9}, {port: 11}, {port: 13}, {port: 15}, {port: 17}]}]",
                "spec.rules[0].ports",
                "9 distinct port ranges; at most 8",
            ),
            (
                "rules: [{name: a, from: [\"*\"]}, {name: a, from: [\"*\"]}]",
                "spec.rules[1].name",
                "also spec.rules[0]",
            ),
            ("mode: audit", "spec.mode", "named `default`"),
        ];
        for (yaml, field, fragment) in cases {
            let e = ns_err("shop", "api", yaml);
            assert_eq!(e.field, *field, "{yaml}: {e}");
            assert!(e.message.contains(fragment), "{yaml}: {e}");
        }
        let e =
            check_cluster("extra", &cluster_spec("enroll: {namespaces: [shop]}"), TD).unwrap_err();
        assert_eq!(e.field, "spec.enroll", "{e}");
        let e = check_cluster("default", &cluster_spec("enroll: {namespaces: [Shop]}"), TD)
            .unwrap_err();
        assert_eq!(e.field, "spec.enroll.namespaces[0]", "{e}");
        let e =
            check_cluster("default", &cluster_spec("rules: [{from: [\"*\"]}]"), TD).unwrap_err();
        assert_eq!(e.field, "spec.rules[0].to", "{e}");
    }

    /// The merge as `docs/POLICY.md` states it: cluster defaults, a namespace's `default`
    /// object over them field by field, and the union of rules, each namespace's confined to
    /// its own destinations.
    #[test]
    fn cluster_and_namespace_objects_merge_as_documented() {
        let mut cluster = BTreeMap::new();
        cluster.insert(
            "default".to_owned(),
            check_cluster(
                "default",
                &cluster_spec(
                    "mode: audit\nsynMac: audit\nenroll: {namespaces: [shop, web, legacy]}",
                ),
                TD,
            )
            .unwrap(),
        );
        cluster.insert(
            "dns".to_owned(),
            check_cluster(
                "dns",
                &cluster_spec(
                    "rules: [{name: dns, from: [\"*\"], to: [\"spiffe://cluster.local/ns/kube-system/sa/coredns\"], ports: [{port: 53, protocol: UDP}]}]",
                ),
                TD,
            )
            .unwrap(),
        );
        let mut namespaced = BTreeMap::new();
        let mut add = |ns: &str, name: &str, yaml: &str| {
            namespaced.insert(
                (ns.to_owned(), name.to_owned()),
                check_namespaced(ns, name, &ns_spec(yaml), TD).unwrap(),
            );
        };
        add("shop", "default", "mode: enforce\nnodeTraffic: deny");
        add("legacy", "default", "mode: disabled");
        add(
            "shop",
            "api",
            "rules: [{name: web, from: [\"spiffe://cluster.local/ns/web/*\"], to: [\"spiffe://cluster.local/ns/shop/sa/api\"], ports: [{port: 8080}, {port: 9000, endPort: 9100, protocol: TCP}]}]",
        );
        add(
            "web",
            "default",
            "rules: [{from: [\"spiffe://cluster.local/ns/shop/*\"]}]",
        );
        let p = assemble(&cluster, &namespaced);
        let s = |ns: &str| p.settings(ns, &id(&format!("ns/{ns}/sa/x")));
        // shop: its own mode and node traffic, the cluster's MAC mode.
        assert_eq!(
            (s("shop").mode, s("shop").node_traffic, s("shop").syn_mac),
            (Mode::Enforce, false, MacMode::Audit)
        );
        // web: a `default` with rules only, so the cluster's settings.
        assert_eq!((s("web").mode, s("web").node_traffic), (Mode::Audit, true));
        // Not enrolled.
        assert_eq!(s("other").mode, Mode::Off);
        assert_eq!(s("legacy").mode, Mode::Off);
        let api = id("ns/shop/sa/api");
        let front = id("ns/web/sa/front");
        assert_eq!(p.grant(&front, &api).to_string(), "8080,9000-9100/tcp");
        assert_eq!(p.grant(&id("ns/other/sa/x"), &api), Grant::None);
        // Another workload of shop: no rule selects it.
        assert_eq!(
            p.grant(&id("ns/other/sa/x"), &id("ns/shop/sa/db")),
            Grant::All
        );
        // web's rule (no `to`) selects all of web, and only web.
        assert_eq!(p.grant(&id("ns/shop/sa/db"), &front), Grant::All);
        assert_eq!(p.grant(&id("ns/other/sa/x"), &front), Grant::None);
        // The cluster's rule.
        let dns = id("ns/kube-system/sa/coredns");
        assert!(p.grant(&front, &dns).admits(IPPROTO_UDP, 53));
        assert!(!p.grant(&front, &dns).admits(IPPROTO_TCP, 53));
        assert!(
            p.denial(&api, &id("ns/other/sa/x"))
                .contains("pcp shop/api#web"),
            "{}",
            p.denial(&api, &id("ns/other/sa/x"))
        );
        // Without the cluster's `default`: built-in defaults, every workload enrolled.
        cluster.remove("default");
        let p = assemble(&cluster, &namespaced);
        assert_eq!(
            p.settings("other", &id("ns/other/sa/x")),
            Settings::default()
        );
    }

    /// An object of a newer definition (a value this version does not know) is kept, marked
    /// unusable, rather than failing the list of every other object; while one is unusable the
    /// agents keep the policy in force (`Inputs`).
    #[test]
    fn an_object_this_version_cannot_read_is_reported_not_dropped() {
        let newer: Decoded<PortcullisPolicy> = serde_json::from_value(serde_json::json!({
            "apiVersion": "portcullis.dev/v1alpha1", "kind": "PortcullisPolicy",
            "metadata": {"name": "default", "namespace": "shop", "generation": 3},
            "spec": {"mode": "lockdown"}
        }))
        .unwrap();
        assert_eq!(newer.meta.name.as_deref(), Some("default"));
        assert!(newer.object.as_ref().unwrap_err().contains("lockdown"));
        let good: Decoded<PortcullisPolicy> = serde_json::from_value(serde_json::json!({
            "apiVersion": "portcullis.dev/v1alpha1", "kind": "PortcullisPolicy",
            "metadata": {"name": "api", "namespace": "shop", "generation": 1},
            "spec": {"rules": [{"from": ["*"]}]},
            "status": {"acceptedGeneration": 1, "acceptedSpec": {"rules": [{"from": ["*"]}]}}
        }))
        .unwrap();
        let mut objects = PolicyObjects::default();
        objects
            .namespaced
            .insert((Some("shop".into()), "api".into()), good);
        let a = from_objects(&objects, TD);
        assert!(a.unusable.is_empty(), "{a:?}");
        assert_eq!(a.in_force, ["pcp shop/api gen 1"]);
        objects
            .namespaced
            .insert((Some("shop".into()), "default".into()), newer);
        let a = from_objects(&objects, TD);
        assert_eq!(a.unusable.len(), 1, "{a:?}");
        assert!(
            a.unusable[0].contains("pcp shop/default: cannot be read"),
            "{a:?}"
        );
    }

    #[test]
    fn a_refused_generation_keeps_the_accepted_one_in_status() {
        let good = ns_spec("rules: [{from: [\"*\"]}]");
        let f = check_namespaced("shop", "api", &good, TD).unwrap();
        let t0 = Timestamp::from_second(1_000).unwrap();
        let s1 = status(Some(1), &good, None, Ok(&f), t0);
        assert_eq!(s1.conditions[0].status, "True");
        assert_eq!(s1.accepted_generation, Some(1));
        assert_eq!(s1.rules, Some(1));
        let bad = ns_spec("rules: [{from: [\"nope\"]}]");
        let e = check_namespaced("shop", "api", &bad, TD).unwrap_err();
        let t1 = Timestamp::from_second(2_000).unwrap();
        let s2 = status(Some(2), &bad, Some(&s1), Err(&e), t1);
        let c = &s2.conditions[0];
        assert_eq!(
            (c.status.as_str(), c.reason.as_str(), c.observed_generation),
            ("False", "Invalid", Some(2))
        );
        assert!(
            c.message.contains("spec.rules[0].from[0]")
                && c.message.contains("`nope`")
                && c.message.contains("keep generation 1"),
            "{}",
            c.message
        );
        assert_eq!(s2.accepted_generation, Some(1));
        assert_eq!(s2.accepted_spec.as_ref(), Some(&good));
        assert_eq!(c.last_transition_time, Time(t1));
        // Checked again, unchanged: nothing to write.
        let s3 = status(
            Some(2),
            &bad,
            Some(&s2),
            Err(&e),
            Timestamp::from_second(3_000).unwrap(),
        );
        assert_eq!(s3, s2);
    }
}
