//! TEMPORARY STUB
use serde_json::Value;
#[derive(Debug, thiserror::Error)]
#[error("stub")]
pub struct SelectorError;
pub struct LabelSelector;
impl LabelSelector { pub fn parse(_s: &str) -> Result<Self, SelectorError> { Ok(LabelSelector) } pub fn is_empty(&self) -> bool { true } pub fn matches(&self, _v: &Value) -> bool { true } }
pub struct FieldSelector;
impl FieldSelector { pub fn parse(_s: &str) -> Result<Self, SelectorError> { Ok(FieldSelector) } pub fn is_empty(&self) -> bool { true } pub fn fields(&self) -> Vec<&str> { vec![] } pub fn matches(&self, _f: impl Fn(&str) -> Option<String>) -> bool { true } }
pub fn field_value(_g: &str, _p: &str, _o: &Value, _f: &str) -> Result<Option<String>, SelectorError> { Ok(None) }
