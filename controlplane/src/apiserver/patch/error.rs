//! Why a patch failed, and how the API server should answer.

use super::PatchType;

/// A patch that could not be applied.
///
/// Each variant names the answer upstream's API server gives, so the caller can
/// build the `Status` from [`PatchError::status_code`] and [`PatchError::reason`]:
///
/// | variant | HTTP | cases |
/// |---|---|---|
/// | `BadRequest` | 400 | body is not JSON or not the right JSON shape; a strategic directive is malformed (`$patch` value, `$retainKeys`, `$setElementOrder/…`, `$deleteFromPrimitiveList/…`); a merge-list item lacks its merge key |
/// | `Invalid` | 422 | a JSON-patch operation fails (`test` mismatch, missing path); the patch gives a field a shape its schema forbids (a map where a list belongs); lists of lists |
/// | `TooManyOperations` | 413 | a JSON patch with more than 10 000 operations |
/// | `Unsupported` | 415 | server-side apply, which is handled elsewhere |
///
/// Upstream answers 500 for a few malformed strategic patches (a missing merge key,
/// an unknown `$patch` value, a `$setElementOrder` list that contradicts the
/// patch). They are the client's fault, so they are `BadRequest` here.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    /// The request body is not a well-formed patch of its type.
    #[error("{0}")]
    BadRequest(String),
    /// The patch is well formed but cannot be applied to this object.
    #[error("{0}")]
    Invalid(String),
    /// A JSON patch with more operations than the server accepts.
    #[error("the allowed maximum operations in a JSON patch is {max}, got {got}")]
    TooManyOperations { max: usize, got: usize },
    /// The patch type is applied elsewhere (server-side apply).
    #[error("{0} patches are not applied by this handler")]
    Unsupported(PatchType),
}

impl PatchError {
    /// The HTTP status code upstream answers with.
    pub fn status_code(&self) -> u16 {
        match self {
            PatchError::BadRequest(_) => 400,
            PatchError::Invalid(_) => 422,
            PatchError::TooManyOperations { .. } => 413,
            PatchError::Unsupported(_) => 415,
        }
    }

    /// The `reason` of the `Status` object upstream answers with.
    pub fn reason(&self) -> &'static str {
        match self {
            PatchError::BadRequest(_) => "BadRequest",
            PatchError::Invalid(_) => "Invalid",
            PatchError::TooManyOperations { .. } => "RequestEntityTooLarge",
            PatchError::Unsupported(_) => "UnsupportedMediaType",
        }
    }
}
