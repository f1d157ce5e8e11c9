//! The policy file's format, and its validation into a [`Policy`]: every defect named with the
//! file, line and field.

use std::{collections::BTreeMap, path::Path};

use marked_yaml::Spanned;
use serde::Deserialize;

use super::{
    Enroll, MacMode, Mode, Pattern, Policy, Rule, Settings, parse_ports, rule_ports,
    valid_namespace,
};
use crate::input::InputError;

impl Policy {
    pub(super) fn validate(path: &Path, f: File) -> Result<Self, InputError> {
        let name = match &f.name {
            Some(n) if n.trim().is_empty() => {
                return Err(InputError::value(path, n, "name", "must not be empty"));
            }
            Some(n) => n.to_string(),
            None => path
                .file_stem()
                .map_or_else(|| "policy".to_owned(), |s| s.to_string_lossy().into_owned()),
        };
        let defaults = settings(
            path,
            "",
            [
                &f.mode,
                &f.node_traffic,
                &f.other_protocols,
                &f.syn_mac,
                &f.cross_node_udp,
            ],
            Settings::default(),
        )?;
        let mut namespaces = BTreeMap::new();
        for (ns, o) in &f.namespaces {
            let prefix = format!("namespaces.{}", ns.as_str());
            check_namespace(path, ns, &prefix)?;
            namespaces.insert(
                ns.to_string(),
                settings(
                    path,
                    &format!("{prefix}."),
                    [
                        &o.mode,
                        &o.node_traffic,
                        &o.other_protocols,
                        &o.syn_mac,
                        &o.cross_node_udp,
                    ],
                    defaults,
                )?,
            );
        }
        let enroll = match &f.enroll {
            None => None,
            Some(e) => {
                for (i, ns) in e.namespaces.iter().enumerate() {
                    check_namespace(path, ns, &format!("enroll.namespaces[{i}]"))?;
                }
                Some(Enroll {
                    namespaces: e.namespaces.iter().map(|n| n.as_str().to_owned()).collect(),
                    workloads: patterns(path, &e.workloads, "enroll.workloads")?,
                })
            }
        };
        let mut rules = Vec::with_capacity(f.rules.len());
        let mut names: BTreeMap<String, usize> = BTreeMap::new();
        for (i, r) in f.rules.iter().enumerate() {
            let field = |n: &str| format!("rules[{i}].{n}");
            let name = match &r.name {
                Some(n) => {
                    if n.trim().is_empty() {
                        return Err(InputError::value(
                            path,
                            n,
                            field("name"),
                            "must not be empty",
                        ));
                    }
                    if let Some(prev) = names.insert(n.to_string(), i) {
                        return Err(InputError::value(
                            path,
                            n,
                            field("name"),
                            format!("rule `{}` is also rules[{prev}]", n.as_str()),
                        ));
                    }
                    n.to_string()
                }
                None => format!("rules[{i}]"),
            };
            let from = patterns(path, &r.from, &field("from"))?;
            let to = patterns(path, &r.to, &field("to"))?;
            if from.is_empty() {
                return Err(InputError::value(
                    path,
                    &r.from,
                    field("from"),
                    "a rule needs at least one source (`*` for any)",
                ));
            }
            if to.is_empty() {
                return Err(InputError::value(
                    path,
                    &r.to,
                    field("to"),
                    "a rule needs at least one destination",
                ));
            }
            let ports = match &r.ports {
                None => None,
                Some(list) => {
                    let mut out = Vec::with_capacity(list.len());
                    for (j, p) in list.iter().enumerate() {
                        out.push(parse_ports(p.as_str()).map_err(|e| {
                            InputError::value(path, p, field(&format!("ports[{j}]")), e)
                        })?);
                    }
                    Some(
                        rule_ports(out)
                            .map_err(|e| InputError::value(path, &r.to, field("ports"), e))?,
                    )
                }
            };
            rules.push(Rule {
                name,
                from,
                to,
                ports,
            });
        }
        Ok(Self {
            name,
            defaults,
            namespaces,
            enroll,
            rules,
        })
    }
}

fn patterns(
    path: &Path,
    list: &[Spanned<String>],
    field: &str,
) -> Result<Vec<Pattern>, InputError> {
    list.iter()
        .enumerate()
        .map(|(i, p)| {
            Pattern::parse(p.as_str())
                .map_err(|e| InputError::value(path, p, format!("{field}[{i}]"), e))
        })
        .collect()
}

/// The settings of a namespace (or of the document, `prefix` empty) from their fields
/// `[mode, node_traffic, other_protocols, syn_mac, cross_node_udp]`; a field left out keeps
/// `base`'s value.
fn settings(
    path: &Path,
    prefix: &str,
    [mode, node_traffic, other_protocols, syn_mac, cross_node_udp]: [&Option<Spanned<String>>; 5],
    base: Settings,
) -> Result<Settings, InputError> {
    let field = |name: &str| format!("{prefix}{name}");
    Ok(Settings {
        mode: parse_mode(path, mode.as_ref(), &field("mode"))?.unwrap_or(base.mode),
        node_traffic: parse_choice(
            path,
            node_traffic.as_ref(),
            &field("node_traffic"),
            "allow",
            "deny",
        )?
        .unwrap_or(base.node_traffic),
        other_protocols: parse_choice(
            path,
            other_protocols.as_ref(),
            &field("other_protocols"),
            "pass",
            "drop",
        )?
        .unwrap_or(base.other_protocols),
        syn_mac: parse_mac_mode(path, syn_mac.as_ref(), &field("syn_mac"))?.unwrap_or(base.syn_mac),
        cross_node_udp: parse_choice(
            path,
            cross_node_udp.as_ref(),
            &field("cross_node_udp"),
            "allow",
            "deny",
        )?
        .unwrap_or(base.cross_node_udp),
    })
}

fn parse_mac_mode(
    path: &Path,
    v: Option<&Spanned<String>>,
    field: &str,
) -> Result<Option<MacMode>, InputError> {
    let Some(v) = v else { return Ok(None) };
    match v.as_str() {
        "require" => Ok(Some(MacMode::Require)),
        "audit" => Ok(Some(MacMode::Audit)),
        "off" => Ok(Some(MacMode::Off)),
        other => Err(InputError::value(
            path,
            v,
            field,
            format!("`{other}` is not `require`, `audit` or `off`"),
        )),
    }
}

fn parse_mode(
    path: &Path,
    v: Option<&Spanned<String>>,
    field: &str,
) -> Result<Option<Mode>, InputError> {
    let Some(v) = v else { return Ok(None) };
    match v.as_str() {
        "enforce" => Ok(Some(Mode::Enforce)),
        "audit" => Ok(Some(Mode::Audit)),
        "off" => Ok(Some(Mode::Off)),
        other => Err(InputError::value(
            path,
            v,
            field,
            format!("`{other}` is not `enforce`, `audit` or `off`"),
        )),
    }
}

fn parse_choice(
    path: &Path,
    v: Option<&Spanned<String>>,
    field: &str,
    yes: &str,
    no: &str,
) -> Result<Option<bool>, InputError> {
    let Some(v) = v else { return Ok(None) };
    if v.as_str() == yes {
        Ok(Some(true))
    } else if v.as_str() == no {
        Ok(Some(false))
    } else {
        Err(InputError::value(
            path,
            v,
            field,
            format!("`{}` is not `{yes}` or `{no}`", v.as_str()),
        ))
    }
}

fn check_namespace(path: &Path, v: &Spanned<String>, field: &str) -> Result<(), InputError> {
    let s = v.as_str();
    if valid_namespace(s) {
        Ok(())
    } else {
        Err(InputError::value(
            path,
            v,
            field,
            format!(
                "`{s}` is not a namespace name (lowercase letters, digits and `-`, at most 63)"
            ),
        ))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct File {
    name: Option<Spanned<String>>,
    mode: Option<Spanned<String>>,
    node_traffic: Option<Spanned<String>>,
    other_protocols: Option<Spanned<String>>,
    syn_mac: Option<Spanned<String>>,
    cross_node_udp: Option<Spanned<String>>,
    enroll: Option<EnrollEntry>,
    #[serde(default)]
    namespaces: std::collections::HashMap<Spanned<String>, NamespaceEntry>,
    #[serde(default)]
    rules: Vec<RuleEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrollEntry {
    #[serde(default)]
    namespaces: Vec<Spanned<String>>,
    #[serde(default)]
    workloads: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NamespaceEntry {
    mode: Option<Spanned<String>>,
    node_traffic: Option<Spanned<String>>,
    other_protocols: Option<Spanned<String>>,
    syn_mac: Option<Spanned<String>>,
    cross_node_udp: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleEntry {
    name: Option<Spanned<String>>,
    from: Spanned<Vec<Spanned<String>>>,
    to: Spanned<Vec<Spanned<String>>>,
    ports: Option<Vec<Spanned<String>>>,
}
