//! YAML request bodies (`application/yaml`, and server-side apply's
//! `application/apply-patch+yaml`), read into JSON values.

use serde_json::Value;

use super::status::ApiError;

/// Parses one YAML document. Numbers with a leading zero are octal, as in
/// kubectl (`defaultMode: 0644` means 420).
pub fn parse(text: &str) -> Result<Value, ApiError> {
    let mut options = serde_saphyr::Options::default();
    options.legacy_octal_numbers = true;
    serde_saphyr::from_str_with_options(text, options)
        .map_err(|e| ApiError::bad_request(format!("invalid YAML in request body: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn octal_modes_and_nesting() {
        let value = parse("a:\n  defaultMode: 0644\n  list: [1, x]\n").unwrap();
        assert_eq!(value["a"]["defaultMode"], 420);
        assert_eq!(value["a"]["list"][1], "x");
        assert!(parse("a: [unclosed").is_err());
    }
}
