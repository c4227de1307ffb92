//! Label and field selectors: parsing and matching, as the upstream API
//! server does for `?labelSelector=` and `?fieldSelector=`.
//!
//! - [`LabelSelector`] parses the string syntax and metav1 `LabelSelector`
//!   objects, validates keys and values, and matches label maps.
//! - [`FieldSelector`] parses the field syntax; [`FieldSelector::validate_for`]
//!   rejects fields a resource does not offer and
//!   [`FieldSelector::matches_object`] reads them with [`field_value`].
//!
//! Every [`SelectorError`] is a client error: answer 400 BadRequest with its
//! message. Upstream wraps field-selector errors on list as
//! `Unable to find "<resource>" that match label selector "<l>", field selector "<f>": <message>`.

mod field;
mod fieldset;
mod label;
pub mod sparse;
mod validation;

pub use field::{FieldOp, FieldSelector, FieldTerm};
pub use fieldset::field_value;
pub use label::{LabelSelector, Operator, Requirement};

/// Why a selector was rejected. The message is upstream's wording.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// A label selector string or metav1 `LabelSelector` is malformed or
    /// names an invalid key or value.
    #[error("{0}")]
    Label(String),
    /// A field selector string is malformed.
    #[error("{0}")]
    Field(String),
    /// A field selector names a field the resource does not support.
    #[error("{0}")]
    UnsupportedField(String),
}
