//! Sets of field paths: what a manager owns, and what a write changed.
//!
//! A set is a tree. A node is reached by a path of [`PathElement`]s and is a
//! *member* when that path itself is in the set; a node that is not a member
//! exists only to lead to members below it. Empty nodes are never kept, so equal
//! sets are equal trees.
//!
//! `managedFields` stores a set as FieldsV1 JSON: each path element is a key
//! (`f:name`, `k:{"name":"app"}`, `v:"x"`, `i:0`), a member with nothing below it
//! is `{}`, and `"."` marks a member that also has members below it.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;

use serde_json::{Map, Value};

use super::MAX_DEPTH;
use super::items;

/// A path from the top of an object.
pub(crate) type Path = Vec<PathElement>;

/// One step of a path. The variant order is upstream's order of path elements:
/// fields, then keys, then set values, then indices.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum PathElement {
    /// A field of a struct or a key of a map: `f:<name>`.
    Field(String),
    /// An item of an associative list, named by its key fields as canonical
    /// JSON (`{"containerPort":80,"protocol":"TCP"}`): `k:<json>`.
    Key(String),
    /// An item of a set, as canonical JSON: `v:<json>`.
    Value(String),
    /// An item of a list by position: `i:<n>`. Decoded, never produced: every
    /// list here is atomic, a set or an associative list.
    Index(usize),
}

impl PathElement {
    pub(crate) fn encode(&self) -> String {
        let tagged = |tag: &str, text: &str| {
            let mut key = String::with_capacity(tag.len() + text.len());
            key.push_str(tag);
            key.push_str(text);
            key
        };
        match self {
            PathElement::Field(name) => tagged("f:", name),
            PathElement::Key(key) => tagged("k:", key),
            PathElement::Value(value) => tagged("v:", value),
            PathElement::Index(index) => format!("i:{index}"),
        }
    }

    /// Parses a FieldsV1 key. Key and value JSON is canonicalised so that a set
    /// written by another server (which may escape or order differently) still
    /// meets the paths computed here.
    fn decode(text: &str) -> Result<PathElement, String> {
        let (Some(tag), Some(rest)) = (text.get(..2), text.get(2..)) else {
            return Err(format!("invalid field path element {text:?}"));
        };
        let json = || {
            serde_json::from_str::<Value>(rest)
                .map_err(|e| format!("invalid field path element {text:?}: {e}"))
        };
        match tag {
            "f:" => Ok(PathElement::Field(rest.to_owned())),
            "k:" => match json()? {
                key @ Value::Object(_) => Ok(PathElement::Key(items::canonical_json(&key))),
                _ => Err(format!(
                    "invalid field path element {text:?}: key is not an object"
                )),
            },
            "v:" => Ok(PathElement::Value(items::canonical_json(&json()?))),
            "i:" => rest
                .parse()
                .map(PathElement::Index)
                .map_err(|_| format!("invalid field path element {text:?}")),
            _ => Err(format!("invalid field path element {text:?}")),
        }
    }
}

/// A path as upstream prints it in conflicts: `.spec.template.spec.containers[name="app"].image`.
pub(crate) fn path_string(path: &[PathElement]) -> String {
    path.iter().map(element_string).collect()
}

/// One path element as upstream prints it.
pub(crate) fn element_string(element: &PathElement) -> String {
    match element {
        PathElement::Field(name) => format!(".{name}"),
        PathElement::Key(key) => match serde_json::from_str::<Map<String, Value>>(key) {
            Ok(fields) => {
                let parts: Vec<String> = fields
                    .iter()
                    .map(|(name, value)| format!("{name}={}", items::display_json(value)))
                    .collect();
                format!("[{}]", parts.join(","))
            }
            Err(_) => format!("[{key}]"),
        },
        PathElement::Value(value) => match serde_json::from_str::<Value>(value) {
            Ok(value) => format!("[={}]", items::display_json(&value)),
            Err(_) => format!("[={value}]"),
        },
        PathElement::Index(index) => format!("[{index}]"),
    }
}

/// A set of paths. The root node is never a member.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct FieldSet {
    member: bool,
    children: BTreeMap<PathElement, FieldSet>,
}

impl FieldSet {
    pub(crate) fn is_empty(&self) -> bool {
        !self.member && self.children.is_empty()
    }

    /// Whether the path leading to this node is itself in the set.
    pub(crate) fn is_member(&self) -> bool {
        self.member
    }

    /// Whether anything below this node is in the set.
    pub(crate) fn has_children(&self) -> bool {
        !self.children.is_empty()
    }

    pub(crate) fn child(&self, element: &PathElement) -> Option<&FieldSet> {
        self.children.get(element)
    }

    pub(crate) fn children(&self) -> impl Iterator<Item = (&PathElement, &FieldSet)> {
        self.children.iter()
    }

    /// Adds `path`; the empty path (the whole object) is never added.
    pub(crate) fn insert(&mut self, path: &[PathElement]) {
        let Some((first, rest)) = path.split_first() else {
            return;
        };
        self.with_child(first, |child| {
            if rest.is_empty() {
                child.member = true;
            } else {
                child.insert(rest);
            }
        });
    }

    /// Makes the path leading to this node a member.
    pub(crate) fn set_member(&mut self) {
        self.member = true;
    }

    pub(crate) fn clear_member(&mut self) {
        self.member = false;
    }

    /// Puts `child` (a set of paths below `element`) under `element`.
    pub(crate) fn adopt(&mut self, element: PathElement, child: FieldSet) {
        if child.is_empty() {
            return;
        }
        match self.children.entry(element) {
            Entry::Vacant(vacant) => {
                vacant.insert(child);
            }
            Entry::Occupied(mut occupied) => occupied.get_mut().union_with(&child),
        }
    }

    #[cfg(test)]
    pub(crate) fn contains(&self, path: &[PathElement]) -> bool {
        match path.split_first() {
            None => self.member,
            Some((first, rest)) => self.children.get(first).is_some_and(|c| c.contains(rest)),
        }
    }

    pub(crate) fn union_with(&mut self, other: &FieldSet) {
        self.member |= other.member;
        for (element, theirs) in &other.children {
            self.with_child(element, |ours| ours.union_with(theirs));
        }
    }

    /// Runs `f` on the node at `element`, made if missing. The element is
    /// copied only then: a write inserts many paths through the same few
    /// nodes.
    fn with_child(&mut self, element: &PathElement, f: impl FnOnce(&mut FieldSet)) {
        match self.children.get_mut(element) {
            Some(child) => f(child),
            None => f(self.children.entry(element.clone()).or_default()),
        }
    }

    /// Removes every member of `other` (exact paths, not what lies below them).
    pub(crate) fn remove_all(&mut self, other: &FieldSet) {
        if other.member {
            self.member = false;
        }
        for (element, theirs) in &other.children {
            if let Some(ours) = self.children.get_mut(element) {
                ours.remove_all(theirs);
                if ours.is_empty() {
                    self.children.remove(element);
                }
            }
        }
    }

    /// Removes `path` and everything below it.
    pub(crate) fn remove_subtree(&mut self, path: &[PathElement]) {
        let Some((first, rest)) = path.split_first() else {
            return;
        };
        if rest.is_empty() {
            self.children.remove(first);
        } else if let Some(child) = self.children.get_mut(first) {
            child.remove_subtree(rest);
            if child.is_empty() {
                self.children.remove(first);
            }
        }
    }

    pub(crate) fn intersection(&self, other: &FieldSet) -> FieldSet {
        let mut both = FieldSet {
            member: self.member && other.member,
            children: BTreeMap::new(),
        };
        for (element, ours) in &self.children {
            if let Some(theirs) = other.children.get(element) {
                let common = ours.intersection(theirs);
                if !common.is_empty() {
                    both.children.insert(element.clone(), common);
                }
            }
        }
        both
    }

    /// Every member path, in upstream's iteration order: at each node the member
    /// children first, then the paths below each child.
    pub(crate) fn paths(&self) -> Vec<Path> {
        let mut out = Vec::new();
        self.collect(&mut Vec::new(), &mut out);
        out
    }

    fn collect(&self, prefix: &mut Path, out: &mut Vec<Path>) {
        for (element, child) in &self.children {
            if child.member {
                prefix.push(element.clone());
                out.push(prefix.clone());
                prefix.pop();
            }
        }
        for (element, child) in &self.children {
            if child.has_children() {
                prefix.push(element.clone());
                child.collect(prefix, out);
                prefix.pop();
            }
        }
    }

    /// The FieldsV1 form of the set.
    pub(crate) fn to_fields_v1(&self) -> Value {
        Value::Object(self.encode())
    }

    fn encode(&self) -> Map<String, Value> {
        let mut map = Map::new();
        for (element, child) in &self.children {
            let mut inner = child.encode();
            if child.member && !inner.is_empty() {
                inner.insert(".".to_owned(), Value::Object(Map::new()));
            }
            map.insert(element.encode(), Value::Object(inner));
        }
        map
    }

    /// Parses FieldsV1 JSON.
    pub(crate) fn from_fields_v1(value: &Value) -> Result<FieldSet, String> {
        let mut set = decode(value, 0)?;
        // A "." at the top would make the whole object a member; nothing upstream
        // writes that, and owning "everything" has no meaning here.
        set.member = false;
        Ok(set)
    }
}

fn decode(value: &Value, depth: usize) -> Result<FieldSet, String> {
    if depth > MAX_DEPTH {
        return Err(format!(
            "fieldsV1 is nested more than {MAX_DEPTH} levels deep"
        ));
    }
    let Value::Object(map) = value else {
        return Err("fieldsV1 entries must be JSON objects".to_owned());
    };
    let mut set = FieldSet::default();
    for (key, child) in map {
        if key == "." {
            set.member = true;
            continue;
        }
        let element = PathElement::decode(key)?;
        let mut node = decode(child, depth + 1)?;
        // `{}` is a member with nothing below it.
        if child.as_object().is_some_and(Map::is_empty) {
            node.member = true;
        }
        if !node.is_empty() {
            // Two spellings of one key (say `80` and `80.0`) meet after canonicalising.
            set.children.entry(element).or_default().union_with(&node);
        }
    }
    Ok(set)
}
