//! Numbers for identities and nodes: the kernel maps speak in `u32`s, people in SPIFFE IDs and
//! node names. The numbering is stored in the pinned `PC_NAMES` map so that a restarted agent
//! reads back the same numbers the surviving auth entries and flows were written with.

use std::collections::HashMap;

use portcullis_common::{NAME_IDENTITY, NAME_NODE, NameKey, capacity, map};

use crate::datapath::{Datapath, DatapathError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
}

#[derive(Debug, Default)]
pub struct Registry {
    ids: HashMap<(Kind, String), u32>,
    names: HashMap<(Kind, u32), String>,
    next: HashMap<Kind, u32>,
}

impl Registry {
    /// Reads the numbering back from the pinned map.
    pub fn load(entries: Vec<(NameKey, String)>) -> Self {
        let mut r = Self::default();
        for (key, name) in entries {
            let kind = match key.kind {
                NAME_IDENTITY => Kind::Identity,
                NAME_NODE => Kind::Node,
                _ => continue,
            };
            r.remember(kind, key.id, name);
        }
        r
    }

    fn remember(&mut self, kind: Kind, id: u32, name: String) {
        let next = self.next.entry(kind).or_insert(1);
        *next = (*next).max(id + 1);
        self.ids.insert((kind, name.clone()), id);
        self.names.insert((kind, id), name);
    }

    /// The number of `name`, assigning (and persisting) a new one on first sight. Numbers
    /// start at 1: 0 means "no identity" in the kernel maps.
    pub fn intern(
        &mut self,
        dp: &mut Datapath,
        kind: Kind,
        name: &str,
    ) -> Result<u32, DatapathError> {
        if let Some(id) = self.ids.get(&(kind, name.to_owned())) {
            return Ok(*id);
        }
        // Only the agent writes the map: once it holds as many names as it has room for, the
        // kernel would refuse the next one, so the system call is saved.
        if self.names.len() >= capacity::NAMES as usize {
            return Err(DatapathError::Full {
                name: map::NAMES,
                capacity: capacity::NAMES,
            });
        }
        let id = *self.next.get(&kind).unwrap_or(&1);
        dp.set_name(
            &NameKey {
                kind: kind.tag(),
                id,
            },
            name,
        )?;
        self.remember(kind, id, name.to_owned());
        Ok(id)
    }

    /// How many names are numbered (and stored in the kernel).
    #[must_use]
    pub fn len(&self) -> usize {
        self.names.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The number of a known name.
    #[must_use]
    pub fn id_of(&self, kind: Kind, name: &str) -> Option<u32> {
        self.ids.get(&(kind, name.to_owned())).copied()
    }

    /// The name of a number, or a placeholder naming the number when it is unknown.
    #[must_use]
    pub fn name(&self, kind: Kind, id: u32) -> String {
        match self.names.get(&(kind, id)) {
            Some(n) => n.clone(),
            None if id == 0 => "-".to_owned(),
            None => format!("#{id}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(r.next[&Kind::Identity], 4);
    }
}
