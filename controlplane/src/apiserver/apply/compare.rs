//! Which fields a write added, modified or removed.
//!
//! Leaves (scalars and atomic values) are added, removed or modified. A struct,
//! map or list item that appears or disappears as a whole is added or removed
//! itself as well as everything in it: that is how an updater comes to own
//! `metadata.labels` (`"."` in FieldsV1) when it created the map. When both
//! sides are empty or missing, the value counts as a leaf so that `{}` versus
//! nothing is still a change.
//!
//! Both objects were accepted by the server earlier, but a list that cannot be
//! keyed (an item without its key) is compared as one atomic value rather than
//! failing the write.

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value};

use super::MAX_DEPTH;
use super::fieldset::{FieldSet, Path, PathElement};
use super::items;
use super::schema::Shape;

/// The difference between two versions of an object.
#[derive(Debug, Default)]
pub(super) struct Comparison {
    pub(super) added: FieldSet,
    pub(super) modified: FieldSet,
    pub(super) removed: FieldSet,
}

impl Comparison {
    /// Fields whose value this write set: added or modified.
    pub(super) fn changed(&self) -> FieldSet {
        let mut changed = self.added.clone();
        changed.union_with(&self.modified);
        changed
    }
}

/// Compares `old` and `new`, whole objects of shape `shape`.
pub(super) fn compare(old: &Value, new: &Value, shape: Shape) -> Comparison {
    compare_where(old, new, shape, &|_, _| true)
}

/// Compares only the fields `keep(parent, name)` accepts, as if the others
/// were missing on both sides: a view of the objects without copying
/// them, which every write would otherwise do twice. A root that is not an
/// object counts as an empty one.
pub(super) fn compare_where(old: &Value, new: &Value, shape: Shape, keep: &Keep) -> Comparison {
    let mut comparison: Comparison = walk_root(old, new, shape, keep);
    // The root is never a member of a set.
    comparison.added.clear_member();
    comparison.modified.clear_member();
    comparison.removed.clear_member();
    comparison
}

/// The fields a write added or modified, as FieldsV1 JSON: the union of
/// [`compare_where`]'s `added` and `modified`, written into JSON as the walk
/// goes. For a create, which has no other owner to take fields from, that
/// is all a managedFields entry needs; building the [`FieldSet`]s first and
/// encoding them after made recording a pod create's managedFields take
/// 8.7-9.3 µs instead of 6.2 µs (in process, one thread).
pub(super) fn changed_fields_v1(
    old: &Value,
    new: &Value,
    shape: Shape,
    keep: &Keep,
) -> Map<String, Value> {
    // The root is never a member, so only what is below it counts.
    let changed: ChangedV1 = walk_root(old, new, shape, keep);
    changed.below
}

/// Walks two whole objects; a root that is not an object counts as an
/// empty one.
fn walk_root<N: Node>(old: &Value, new: &Value, shape: Shape, keep: &Keep) -> N {
    let empty = Value::Object(Map::new());
    let old = if old.is_object() { old } else { &empty };
    let new = if new.is_object() { new } else { &empty };
    walk(Some(old), Some(new), shape, &mut Vec::new(), 0, keep)
}

/// Whether the field `name` under the path `parent` is compared.
pub(super) type Keep = dyn Fn(&[PathElement], &str) -> bool;

/// How two values at one path are compared.
enum Walk<'v> {
    Leaf,
    Fields(
        Option<&'v Map<String, Value>>,
        Option<&'v Map<String, Value>>,
    ),
    Items(Vec<(PathElement, &'v Value)>, Vec<(PathElement, &'v Value)>),
}

/// What a walk builds at each path, from the bottom up: the children's
/// results are adopted under their path elements, then the node itself is
/// marked as a leaf or a container.
trait Node: Default {
    /// Puts a child's result under `element`, the child's own path element.
    fn adopt(&mut self, element: PathElement, below: Self);
    fn leaf(&mut self, old: Option<&Value>, new: Option<&Value>);
    /// A struct, map or list that appeared or disappeared.
    fn container(&mut self, old: Option<&Value>, new: Option<&Value>);
}

/// The result below `path` (whose last element is where `old` and `new`
/// sit), built from the bottom up: each child's result moves into its
/// parent's under the child's path element, so nothing is searched from the
/// root and no element is copied per path.
fn walk<N: Node>(
    old: Option<&Value>,
    new: Option<&Value>,
    shape: Shape,
    path: &mut Path,
    depth: usize,
    keep: &Keep,
) -> N {
    let how = if depth > MAX_DEPTH {
        Walk::Leaf
    } else {
        classify(old, new, shape)
    };
    let mut here = N::default();
    match how {
        Walk::Leaf => here.leaf(old, new),
        Walk::Fields(old_fields, new_fields) => {
            let names = old_fields.into_iter().flat_map(Map::keys).chain(
                new_fields.into_iter().flat_map(Map::keys).filter(|name| {
                    !old_fields.is_some_and(|fields| fields.contains_key(name.as_str()))
                }),
            );
            for name in names {
                if !keep(path, name) {
                    continue;
                }
                let pair = (
                    old_fields.and_then(|f| f.get(name)),
                    new_fields.and_then(|f| f.get(name)),
                );
                let child = Child(PathElement::Field(name.clone()), shape.child(name));
                descend(&mut here, child, pair, path, depth, keep);
            }
            here.container(old, new);
        }
        Walk::Items(old_items, new_items) => {
            let item_shape = match shape {
                Shape::ListMap(list) => list.item(),
                _ => Shape::Atomic,
            };
            let old_by_name = first_occurrences(&old_items);
            let new_by_name = first_occurrences(&new_items);
            let names = old_items.iter().chain(
                new_items
                    .iter()
                    .filter(|(name, _)| !old_by_name.contains_key(name)),
            );
            let mut done = HashSet::new();
            for (name, _) in names {
                if !done.insert(name) {
                    continue;
                }
                let pair = (
                    old_by_name.get(name).copied(),
                    new_by_name.get(name).copied(),
                );
                descend(
                    &mut here,
                    Child(name.clone(), item_shape),
                    pair,
                    path,
                    depth,
                    keep,
                );
            }
            here.container(old, new);
        }
    }
    here
}

/// A child's path element and its shape.
struct Child(PathElement, Shape);

/// Walks the child `pair` (its old and new value) one level below `depth`
/// and adopts what it found into `here`.
fn descend<N: Node>(
    here: &mut N,
    Child(element, shape): Child,
    (old, new): (Option<&Value>, Option<&Value>),
    path: &mut Path,
    depth: usize,
    keep: &Keep,
) {
    path.push(element);
    let below = walk(old, new, shape, path, depth + 1, keep);
    if let Some(element) = path.pop() {
        here.adopt(element, below);
    }
}

impl Node for Comparison {
    /// The element is copied only for a second or third set that is not
    /// empty.
    fn adopt(&mut self, element: PathElement, below: Comparison) {
        let Comparison {
            added,
            modified,
            removed,
        } = below;
        if !modified.is_empty() {
            self.modified.adopt(element.clone(), modified);
        }
        if !removed.is_empty() {
            self.removed.adopt(element.clone(), removed);
        }
        self.added.adopt(element, added);
    }

    fn leaf(&mut self, old: Option<&Value>, new: Option<&Value>) {
        match (old, new) {
            (None, Some(_)) => self.added.set_member(),
            (Some(_), None) => self.removed.set_member(),
            (Some(a), Some(b)) if !items::json_equal(a, b) => self.modified.set_member(),
            _ => {}
        }
    }

    /// A struct, map or list that appeared or disappeared is itself added or removed.
    fn container(&mut self, old: Option<&Value>, new: Option<&Value>) {
        match (old, new) {
            (None, Some(_)) => self.added.set_member(),
            (Some(_), None) => self.removed.set_member(),
            _ => {}
        }
    }
}

/// The added and modified fields at one path, in FieldsV1 form: whether the
/// path itself is a member, and the members below it.
#[derive(Default)]
struct ChangedV1 {
    member: bool,
    below: Map<String, Value>,
}

impl Node for ChangedV1 {
    /// As [`FieldSet`] encodes: a member with nothing below is `{}`, one
    /// with members below also has `"."`; an empty child is left out.
    fn adopt(&mut self, element: PathElement, below: ChangedV1) {
        let ChangedV1 { member, mut below } = below;
        if !member && below.is_empty() {
            return;
        }
        if member && !below.is_empty() {
            below.insert(".".to_owned(), Value::Object(Map::new()));
        }
        self.below.insert(element.encode(), Value::Object(below));
    }

    fn leaf(&mut self, old: Option<&Value>, new: Option<&Value>) {
        self.member = match (old, new) {
            (None, Some(_)) => true,
            (Some(a), Some(b)) => !items::json_equal(a, b),
            _ => false,
        };
    }

    fn container(&mut self, old: Option<&Value>, new: Option<&Value>) {
        self.member |= old.is_none() && new.is_some();
    }
}

/// Decides whether `old` and `new` are compared as containers. `null` stands for
/// an empty container of whatever kind the other side is.
fn classify<'v>(old: Option<&'v Value>, new: Option<&'v Value>, shape: Shape) -> Walk<'v> {
    let present = |v: Option<&'v Value>| v.filter(|v| !v.is_null());
    let (old_value, new_value) = (present(old), present(new));
    if old_value.is_none() && new_value.is_none() {
        return Walk::Leaf;
    }
    let walk = match shape {
        Shape::Struct(_) | Shape::Map => match (old_value, new_value) {
            (None | Some(Value::Object(_)), None | Some(Value::Object(_))) => Walk::Fields(
                old_value.and_then(Value::as_object),
                new_value.and_then(Value::as_object),
            ),
            _ => Walk::Leaf,
        },
        Shape::ListMap(list) => {
            let name = |item: &Value| items::key_element(list.keys(), item).ok();
            named_items(old_value, new_value, name)
        }
        Shape::Set => named_items(old_value, new_value, |item| items::value_element(item).ok()),
        Shape::Atomic => Walk::Leaf,
    };
    if is_empty(old_value) && is_empty(new_value) {
        Walk::Leaf
    } else {
        walk
    }
}

fn named_items<'v>(
    old: Option<&'v Value>,
    new: Option<&'v Value>,
    name: impl Fn(&Value) -> Option<PathElement>,
) -> Walk<'v> {
    let named = |value: Option<&'v Value>| -> Option<Vec<(PathElement, &'v Value)>> {
        match value {
            None => Some(Vec::new()),
            Some(Value::Array(entries)) => entries
                .iter()
                .map(|item| name(item).map(|element| (element, item)))
                .collect(),
            Some(_) => None,
        }
    };
    match (named(old), named(new)) {
        (Some(old_items), Some(new_items)) => Walk::Items(old_items, new_items),
        _ => Walk::Leaf,
    }
}

fn is_empty(value: Option<&Value>) -> bool {
    match value {
        None => true,
        Some(Value::Object(fields)) => fields.is_empty(),
        Some(Value::Array(entries)) => entries.is_empty(),
        Some(_) => false,
    }
}

/// Items by name; a repeated name keeps its first item, as upstream compares.
fn first_occurrences<'a, 'v>(
    named: &'a [(PathElement, &'v Value)],
) -> HashMap<&'a PathElement, &'v Value> {
    let mut by_name = HashMap::with_capacity(named.len());
    for (name, item) in named {
        by_name.entry(name).or_insert(*item);
    }
    by_name
}
