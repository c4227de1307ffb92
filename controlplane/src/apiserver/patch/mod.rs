//! TEMPORARY STUB (replaced by helper-patch merge)
use serde_json::{Map, Value};
#[derive(Clone, Copy, Debug)]
pub enum PatchType {
    Json,
    Merge,
    StrategicMerge,
    Apply,
}
impl PatchType {
    pub fn from_content_type(_c: &str) -> Option<Self> {
        None
    }
}
#[derive(Debug, thiserror::Error)]
#[error("stub")]
pub struct PatchError;
impl From<PatchError> for super::status::ApiError {
    fn from(_: PatchError) -> Self {
        super::status::ApiError::bad_request("stub")
    }
}
pub fn apply(
    _g: &str,
    _k: &str,
    _c: &Value,
    _t: PatchType,
    _b: &[u8],
) -> Result<Value, PatchError> {
    Err(PatchError)
}
pub fn annotate_openapi(_s: &mut Map<String, Value>) {}
