//! The JSON Schemas of the protocol (draft 2020-12), generated from its types: a request on
//! stdin, and one event line on stdout. They are committed under `schema/`; a unit test fails
//! when the committed files differ from what the types generate (`REIMAGE_BLESS=1` rewrites
//! them).

use schemars::generate::SchemaSettings;
use serde_json::Value;

use super::event::Event;

/// Where the committed schemas live, relative to the repository.
pub const REQUEST_FILE: &str = "schema/request.json";
pub const EVENTS_FILE: &str = "schema/events.json";

/// The schema of a request: the fields each op accepts (`deny_unknown_fields` holds here too).
pub fn request() -> Value {
    let schema = super::request::json_schema(SchemaSettings::draft2020_12().for_deserialize());
    finish(schema.to_value(), "reimage request (protocol api 1)")
}

/// The schema of one line of the event stream, as reimage writes it.
pub fn events() -> Value {
    let schema = SchemaSettings::draft2020_12()
        .for_serialize()
        .into_generator()
        .into_root_schema_for::<Event>();
    finish(schema.to_value(), "reimage event (protocol api 1)")
}

fn finish(mut schema: Value, title: &str) -> Value {
    if let Some(object) = schema.as_object_mut() {
        object.insert("title".into(), title.into());
    }
    schema
}

/// A schema as it is committed: pretty-printed, with a final newline.
pub fn to_text(schema: &Value) -> String {
    let mut text = serde_json::to_string_pretty(schema).unwrap_or_default();
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed schemas are the generated ones; `REIMAGE_BLESS=1` rewrites them.
    #[test]
    fn committed_schemas_are_current() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        for (file, schema) in [(REQUEST_FILE, request()), (EVENTS_FILE, events())] {
            let path = root.join(file);
            let generated = to_text(&schema);
            if std::env::var_os("REIMAGE_BLESS").is_some() {
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, &generated).unwrap();
                continue;
            }
            let committed = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                committed == generated,
                "{file} is not what the protocol's types generate; run \
                 `REIMAGE_BLESS=1 cargo test --lib committed_schemas_are_current` and commit it"
            );
        }
    }

    /// The codes listed in the schema are the ones the code writes.
    #[test]
    fn codes_in_the_schema_are_the_codes_written() {
        use crate::error::{Code, Warning};
        let text = serde_json::to_string(&events()).unwrap();
        for code in [
            Code::InvalidRequest,
            Code::VolumeHasClones,
            Code::Unsupported,
        ] {
            let name = serde_json::to_value(code).unwrap();
            assert_eq!(name, code.as_str());
            assert!(text.contains(&format!("\"{}\"", code.as_str())));
        }
        for warning in [Warning::SizeIgnored, Warning::QuotaUnavailable] {
            assert_eq!(serde_json::to_value(warning).unwrap(), warning.as_str());
        }
    }
}
