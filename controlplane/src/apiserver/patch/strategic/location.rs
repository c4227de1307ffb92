//! Where in the object the merge is, for error messages and the depth bound.

use std::fmt;

use serde_json::Value;

use super::super::{MAX_DEPTH, PatchError};

/// A position in the object being patched, as a chain of borrowed segments that is
/// only rendered when an error needs it.
pub(super) struct Loc<'a> {
    parent: Option<&'a Loc<'a>>,
    segment: Segment<'a>,
    depth: usize,
}

enum Segment<'a> {
    Root,
    Field(&'a str),
    /// A merge-list item, named by its merge key: `containers[name="app"]`.
    Item {
        key: &'a str,
        value: &'a Value,
    },
    Index(usize),
}

impl Loc<'static> {
    pub(super) fn root() -> Loc<'static> {
        Loc {
            parent: None,
            segment: Segment::Root,
            depth: 0,
        }
    }
}

impl<'a> Loc<'a> {
    pub(super) fn field<'b>(&'b self, name: &'b str) -> Result<Loc<'b>, PatchError> {
        self.child(Segment::Field(name))
    }

    pub(super) fn item<'b>(
        &'b self,
        key: &'b str,
        value: &'b Value,
    ) -> Result<Loc<'b>, PatchError> {
        self.child(Segment::Item { key, value })
    }

    pub(super) fn index(&self, index: usize) -> Result<Loc<'_>, PatchError> {
        self.child(Segment::Index(index))
    }

    /// A malformed patch (400), located.
    pub(super) fn bad_request(&self, message: impl fmt::Display) -> PatchError {
        PatchError::BadRequest(self.describe(message))
    }

    /// A patch that does not fit the object (422), located.
    pub(super) fn invalid(&self, message: impl fmt::Display) -> PatchError {
        PatchError::Invalid(self.describe(message))
    }

    fn child<'b>(&'b self, segment: Segment<'b>) -> Result<Loc<'b>, PatchError> {
        if self.depth >= MAX_DEPTH {
            return Err(PatchError::BadRequest(format!(
                "the patch is nested more than {MAX_DEPTH} levels deep"
            )));
        }
        Ok(Loc {
            parent: Some(self),
            segment,
            depth: self.depth + 1,
        })
    }

    fn describe(&self, message: impl fmt::Display) -> String {
        if self.parent.is_none() {
            message.to_string()
        } else {
            format!("{self}: {message}")
        }
    }
}

impl fmt::Display for Loc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(parent) = self.parent {
            parent.fmt(f)?;
        }
        match self.segment {
            Segment::Root => Ok(()),
            Segment::Field(name) if self.depth == 1 => f.write_str(name),
            Segment::Field(name) => write!(f, ".{name}"),
            Segment::Item { key, value } => write!(f, "[{key}={value}]"),
            Segment::Index(index) => write!(f, "[{index}]"),
        }
    }
}
