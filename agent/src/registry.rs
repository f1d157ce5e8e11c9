//! Numbers for identities and nodes: the kernel maps speak in `u32`s, people in SPIFFE IDs and
//! node names. The numbering is stored in the pinned `PC_NAMES` map so that a restarted agent
//! reads back the same numbers the surviving auth entries and flows were written with.
//!
//! Numbers are reclaimed: a number whose name has left cluster state is removed from the map
//! once nothing uses it any more (no workload, no auth entry), so that a map filled with the
//! identities of pods long gone never leaves new local pods unnumbered. A reclaimed number is
//! not handed out again until the counter wraps (after 2^32 − 1 numbers), so a stale reference
//! can never come to mean another name; the counter itself is kept in the map too, so that a
//! restart does not hand out again the numbers reclaimed at the top.

use std::collections::{HashMap, HashSet};

use portcullis_common::{NAME_IDENTITY, NAME_NEXT, NAME_NODE, NameKey, capacity, map};

use crate::datapath::{DatapathError, NameMap};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Identity,
    Node,
}

impl Kind {
    const fn tag(self) -> u32 {
        match self {
            Self::Identity => NAME_IDENTITY,
            Self::Node => NAME_NODE,
        }
    }

    const fn slot(self) -> usize {
        match self {
            Self::Identity => 0,
            Self::Node => 1,
        }
    }
}

#[derive(Debug, Default)]
pub struct Registry {
    /// Per kind: name → number.
    ids: [HashMap<String, u32>; 2],
    /// Per kind: number → name.
    names: [HashMap<u32, String>; 2],
    next: [u32; 2],
    /// Numbers that may have lost their last user since the last [`Registry::reclaim`].
    candidates: HashSet<(Kind, u32)>,
    reclaimed: u64,
    /// Which of the two counters are stored in the map (they take room too).
    counters: [bool; 2],
}

impl Registry {
    /// Reads the numbering back from the pinned map.
    pub fn load(entries: Vec<(NameKey, String)>) -> Self {
        let mut r = Self {
            next: [1, 1],
            ..Self::default()
        };
        for (key, name) in entries {
            let kind = match key.kind {
                NAME_IDENTITY => Kind::Identity,
                NAME_NODE => Kind::Node,
                NAME_NEXT => {
                    let slot = match key.id {
                        NAME_IDENTITY => Kind::Identity.slot(),
                        NAME_NODE => Kind::Node.slot(),
                        _ => continue,
                    };
                    if let Ok(next) = name.parse::<u32>() {
                        r.next[slot] = r.next[slot].max(next);
                    }
                    r.counters[slot] = true;
                    continue;
                }
                _ => continue,
            };
            r.remember(kind, key.id, name);
        }
        r
    }

    fn remember(&mut self, kind: Kind, id: u32, name: String) {
        let s = kind.slot();
        self.next[s] = self.next[s].max(id.saturating_add(1));
        self.ids[s].insert(name.clone(), id);
        self.names[s].insert(id, name);
    }

    /// The next free number of `kind`: after the highest ever given, or, once the counter has
    /// wrapped, the lowest one not in use.
    fn fresh(&mut self, kind: Kind) -> u32 {
        let s = kind.slot();
        if self.next[s] < u32::MAX {
            let id = self.next[s];
            self.next[s] += 1;
            return id;
        }
        (1..u32::MAX)
            .find(|id| !self.names[s].contains_key(id))
            .unwrap_or(u32::MAX)
    }

    /// The number of `name`, assigning (and persisting) a new one on first sight. Numbers
    /// start at 1: 0 means "no identity" in the kernel maps.
    pub fn intern(
        &mut self,
        maps: &mut impl NameMap,
        kind: Kind,
        name: &str,
    ) -> Result<u32, DatapathError> {
        if let Some(id) = self.ids[kind.slot()].get(name) {
            return Ok(*id);
        }
        // Only the agent writes the map: once it holds as many entries as it has room for, the
        // kernel would refuse the next one, so the system call is saved.
        if self.entries() >= capacity::NAMES as usize {
            return Err(DatapathError::Full {
                name: map::NAMES,
                capacity: capacity::NAMES,
            });
        }
        let id = self.fresh(kind);
        maps.set_name(
            &NameKey {
                kind: kind.tag(),
                id,
            },
            name,
        )?;
        self.remember(kind, id, name.to_owned());
        // Until something uses it, it is a candidate like any number that lost its users.
        self.candidates.insert((kind, id));
        Ok(id)
    }

    /// Notes that `id` may have lost its last user; [`Registry::reclaim`] decides.
    pub fn release(&mut self, kind: Kind, id: u32) {
        if self.names[kind.slot()].contains_key(&id) {
            self.candidates.insert((kind, id));
        }
    }

    /// Notes that the number of `name`, if any, may have lost its last user.
    pub fn release_name(&mut self, kind: Kind, name: &str) {
        if let Some(id) = self.id_of(kind, name) {
            self.candidates.insert((kind, id));
        }
    }

    /// Removes every candidate that `in_use` says nothing uses any more, from the map and from
    /// the numbering; returns how many. A number whose removal the kernel refuses stays a
    /// candidate.
    pub fn reclaim(
        &mut self,
        maps: &mut impl NameMap,
        mut in_use: impl FnMut(Kind, u32, &str) -> bool,
    ) -> usize {
        let candidates = std::mem::take(&mut self.candidates);
        let mut removed = 0;
        let mut kinds = [false; 2];
        for (kind, id) in candidates {
            let s = kind.slot();
            let Some(name) = self.names[s].get(&id) else {
                continue;
            };
            if in_use(kind, id, name) {
                continue;
            }
            let key = NameKey {
                kind: kind.tag(),
                id,
            };
            if let Err(e) = maps.remove_name(&key) {
                tracing::warn!(error = %e, "cannot remove a number nothing uses; retrying later");
                self.candidates.insert((kind, id));
                continue;
            }
            if let Some(name) = self.names[s].remove(&id) {
                self.ids[s].remove(&name);
            }
            kinds[s] = true;
            removed += 1;
        }
        // Persist the counters past what was reclaimed, for the next agent.
        for kind in [Kind::Identity, Kind::Node] {
            if !kinds[kind.slot()] {
                continue;
            }
            let key = NameKey {
                kind: NAME_NEXT,
                id: kind.tag(),
            };
            // There is room: the number reclaimed freed an entry.
            match maps.set_name(&key, &self.next[kind.slot()].to_string()) {
                Ok(()) => self.counters[kind.slot()] = true,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot store the numbering's counter; a restarted agent may reuse reclaimed numbers")
                }
            }
        }
        self.reclaimed += removed as u64;
        removed
    }

    /// How many names are numbered (and stored in the kernel).
    #[must_use]
    pub fn len(&self) -> usize {
        self.names[0].len() + self.names[1].len()
    }

    /// The map's entries: the names and the counters stored.
    #[must_use]
    pub fn entries(&self) -> usize {
        self.len() + self.counters.iter().filter(|c| **c).count()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Numbers reclaimed since start.
    #[must_use]
    pub fn reclaimed(&self) -> u64 {
        self.reclaimed
    }

    /// The number of a known name.
    #[must_use]
    pub fn id_of(&self, kind: Kind, name: &str) -> Option<u32> {
        self.ids[kind.slot()].get(name).copied()
    }

    /// The name of a number, if it is known.
    #[must_use]
    pub fn lookup(&self, kind: Kind, id: u32) -> Option<&str> {
        self.names[kind.slot()].get(&id).map(String::as_str)
    }

    /// The name of a number, or a placeholder naming the number when it is unknown.
    #[must_use]
    pub fn name(&self, kind: Kind, id: u32) -> String {
        match self.lookup(kind, id) {
            Some(n) => n.to_owned(),
            None if id == 0 => "-".to_owned(),
            None => format!("#{id}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::memory::Maps;

    #[test]
    fn loads_numbering_and_continues_after_the_highest() {
        let r = Registry::load(vec![
            (
                NameKey {
                    kind: NAME_IDENTITY,
                    id: 3,
                },
                "spiffe://td/a".into(),
            ),
            (
                NameKey {
                    kind: NAME_NODE,
                    id: 1,
                },
                "node-1".into(),
            ),
            (NameKey { kind: 99, id: 1 }, "ignored".into()),
        ]);
        assert_eq!(r.id_of(Kind::Identity, "spiffe://td/a"), Some(3));
        assert_eq!(r.name(Kind::Node, 1), "node-1");
        assert_eq!(r.name(Kind::Node, 7), "#7");
        assert_eq!(r.name(Kind::Identity, 0), "-");
        assert_eq!(r.next[Kind::Identity.slot()], 4);
    }

    fn names_in(maps: &Maps) -> usize {
        maps.names.keys().filter(|k| k.kind != NAME_NEXT).count()
    }

    /// Identities come and go without the map filling: a number nothing uses is removed from
    /// the kernel, and is not handed to the next name, not even after a restart.
    #[test]
    fn numbers_nothing_uses_are_reclaimed_and_not_reused() {
        let mut maps = Maps::default();
        let mut r = Registry::load(Vec::new());
        let intern = |r: &mut Registry, maps: &mut Maps, n: &str| {
            r.intern(maps, Kind::Identity, &format!("spiffe://td/{n}"))
                .unwrap()
        };
        let a = intern(&mut r, &mut maps, "a");
        let b = intern(&mut r, &mut maps, "b");
        // Both in use: nothing goes.
        assert_eq!(r.reclaim(&mut maps, |_, _, _| true), 0);
        assert_eq!(names_in(&maps), 2);
        // `a` leaves cluster state.
        r.release(Kind::Identity, a);
        assert_eq!(r.reclaim(&mut maps, |_, id, _| id != a), 1);
        assert_eq!(r.id_of(Kind::Identity, "spiffe://td/a"), None);
        assert_eq!(names_in(&maps), 1);
        assert_eq!(r.id_of(Kind::Identity, "spiffe://td/b"), Some(b));
        let c = intern(&mut r, &mut maps, "c");
        assert!(c != a && c != b, "a reclaimed number is not reused");
        // A candidate that is used again is kept.
        r.release(Kind::Identity, b);
        assert_eq!(r.reclaim(&mut maps, |_, _, _| true), 0);
        assert_eq!(r.len(), 2);
        // The highest number is reclaimed, and the agent restarts: it is not handed out again.
        r.release(Kind::Identity, c);
        assert_eq!(r.reclaim(&mut maps, |_, id, _| id != c), 1);
        let mut restarted =
            Registry::load(maps.names.iter().map(|(k, v)| (*k, v.clone())).collect());
        assert_eq!(restarted.len(), 1, "the counter is not a name");
        let d = intern(&mut restarted, &mut maps, "d");
        assert!(d > c, "{d} reuses a reclaimed number after a restart");
    }
}
