//! A Confluent Schema Registry, asked which message a schema id and its message indexes name, for
//! the `confluent` framing when the config does not map an id itself.
//!
//! One GET of `/schemas/ids/<id>` per schema id; the answer's Protobuf text is scanned for its
//! package and its messages (nested ones included, in the order Confluent's message indexes count
//! them), and kept for the whole process in a map every reader thread shares. A failed lookup is
//! kept for [`RETRY_AFTER`], so a registry that is down costs one request per id and half-minute,
//! not one per record.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;

/// How long a failed lookup is remembered before the registry is asked again.
pub const RETRY_AFTER: Duration = Duration::from_secs(30);
const TIMEOUT: Duration = Duration::from_secs(10);

/// A schema's messages by message-index path (`"0"`, `"2:1"`), as full names.
type Messages = Arc<HashMap<String, String>>;

pub struct SchemaRegistry {
    url: String,
    agent: ureq::Agent,
    /// Per schema id, what the registry said (or the error, and when), behind a lock of its own:
    /// readers that meet the same new id wait for one request, readers of other ids do not wait.
    schemas: DashMap<u32, Arc<Mutex<Option<Lookup>>>>,
    /// The schemas found, read without a lock of their own: every record of a known id comes here.
    found: DashMap<u32, Messages>,
}

type Lookup = Result<Messages, (String, Instant)>;

impl std::fmt::Debug for SchemaRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchemaRegistry")
            .field("url", &self.url)
            .finish()
    }
}

#[derive(serde::Deserialize)]
struct SchemaAnswer {
    schema: String,
    #[serde(rename = "schemaType", default)]
    schema_type: Option<String>,
}

impl SchemaRegistry {
    /// A registry at `url` (`https://user:password@registry:8081` for basic authentication).
    pub fn new(url: &str) -> Result<SchemaRegistry, String> {
        let parsed =
            url::Url::parse(url).map_err(|e| format!("framing.registry_url {url:?}: {e}"))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(format!(
                "framing.registry_url {url:?}: expected an http:// or https:// URL"
            ));
        }
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(TIMEOUT))
            .build();
        Ok(SchemaRegistry {
            url: url.trim_end_matches('/').to_string(),
            agent: ureq::Agent::new_with_config(config),
            schemas: DashMap::new(),
            found: DashMap::new(),
        })
    }

    /// The full name of the message at `index_key` (see [`index_key`]) in schema `schema_id`.
    pub fn message(&self, schema_id: u32, index_key: &str) -> Result<String, String> {
        if let Some(messages) = self.found.get(&schema_id) {
            return lookup_index(schema_id, &messages, index_key);
        }
        let slot = self.schemas.entry(schema_id).or_default().clone();
        let mut lookup = slot
            .lock()
            .map_err(|_| format!("schema id {schema_id}: an earlier lookup panicked"))?;
        let messages = match &*lookup {
            Some(Ok(messages)) => messages.clone(),
            Some(Err((error, at))) if at.elapsed() < RETRY_AFTER => return Err(error.clone()),
            _ => {
                let fetched = self.fetch(schema_id).map(Arc::new);
                *lookup = Some(fetched.clone().map_err(|error| (error, Instant::now())));
                let messages = fetched?;
                self.found.insert(schema_id, messages.clone());
                messages
            }
        };
        lookup_index(schema_id, &messages, index_key)
    }

    fn fetch(&self, schema_id: u32) -> Result<HashMap<String, String>, String> {
        let url = format!("{}/schemas/ids/{schema_id}", self.url);
        let shown = redacted(&url);
        let answer: SchemaAnswer = self
            .agent
            .get(&url)
            .header("Accept", "application/vnd.schemaregistry.v1+json")
            .call()
            .map_err(|e| format!("asking the schema registry {shown}: {e}"))?
            .body_mut()
            .read_json()
            .map_err(|e| format!("reading the schema registry's answer from {shown}: {e}"))?;
        if let Some(kind) = answer.schema_type.as_deref().filter(|k| *k != "PROTOBUF") {
            return Err(format!(
                "schema id {schema_id} is a {kind} schema, not Protobuf"
            ));
        }
        let messages = messages_of(&answer.schema);
        if messages.is_empty() {
            return Err(format!("schema id {schema_id} declares no message"));
        }
        Ok(messages)
    }
}

fn lookup_index(schema_id: u32, messages: &Messages, index_key: &str) -> Result<String, String> {
    messages.get(index_key).cloned().ok_or_else(|| {
        let mut known: Vec<&str> = messages.keys().map(String::as_str).collect();
        known.sort();
        format!(
            "schema id {schema_id} has no message at indexes {index_key} (it has {})",
            known.join(", ")
        )
    })
}

fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_string(),
    }
}

/// The messages a `.proto` text declares, by message-index path (`"0"` for the first top-level
/// message, `"2:1"` for the second message nested in the third), as full names. Comments and
/// string literals are skipped; enums, services and other blocks are passed over whole.
pub fn messages_of(proto: &str) -> HashMap<String, String> {
    enum Block {
        /// A message: its name, its index path (None when it cannot be addressed), and how many
        /// messages it declares so far.
        Message(String, Option<Vec<i32>>, i32),
        Other,
    }
    let tokens = tokens(proto);
    let mut package = String::new();
    let mut out = HashMap::new();
    let mut stack: Vec<Block> = Vec::new();
    let mut top_level = 0i32;
    let mut i = 0;
    while i < tokens.len() {
        match tokens[i].as_str() {
            "package" if stack.is_empty() => {
                package = tokens.get(i + 1).cloned().unwrap_or_default();
                i += 2;
                continue;
            }
            "message" if tokens.get(i + 2).is_some_and(|t| t == "{") => {
                let name = tokens[i + 1].clone();
                let path = match stack.last_mut() {
                    None => {
                        top_level += 1;
                        Some(vec![top_level - 1])
                    }
                    Some(Block::Message(_, parent, children)) => {
                        *children += 1;
                        parent.as_ref().map(|p| {
                            let mut path = p.clone();
                            path.push(*children - 1);
                            path
                        })
                    }
                    Some(Block::Other) => None,
                };
                let mut full = package.clone();
                let enclosing = stack.iter().filter_map(|b| match b {
                    Block::Message(n, _, _) => Some(n.as_str()),
                    Block::Other => None,
                });
                for n in enclosing.chain([name.as_str()]) {
                    if !full.is_empty() {
                        full.push('.');
                    }
                    full.push_str(n);
                }
                if let Some(path) = &path {
                    out.insert(index_key(path), full);
                }
                stack.push(Block::Message(name, path, 0));
                i += 3;
                continue;
            }
            "{" => stack.push(Block::Other),
            "}" => {
                stack.pop();
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// `"2:1"` for message indexes [2, 1]; `"0"` for [0] and for none (Confluent's short form).
pub fn index_key(indexes: &[i32]) -> String {
    if indexes.is_empty() {
        return "0".into();
    }
    indexes
        .iter()
        .map(i32::to_string)
        .collect::<Vec<_>>()
        .join(":")
}

/// Identifiers, punctuation and `{`/`}` of a `.proto` text, without comments and strings.
fn tokens(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '/' if chars.peek() == Some(&'/') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            '/' if chars.peek() == Some(&'*') => {
                chars.next();
                let mut last = ' ';
                for c in chars.by_ref() {
                    if last == '*' && c == '/' {
                        break;
                    }
                    last = c;
                }
            }
            '"' | '\'' => {
                let mut escaped = false;
                for d in chars.by_ref() {
                    if escaped {
                        escaped = false;
                    } else if d == '\\' {
                        escaped = true;
                    } else if d == c {
                        break;
                    }
                }
                out.push("\"\"".into());
            }
            c if c.is_alphanumeric() || c == '_' || c == '.' => {
                let mut word = String::from(c);
                while let Some(&d) = chars.peek() {
                    if d.is_alphanumeric() || d == '_' || d == '.' {
                        word.push(d);
                        chars.next();
                    } else {
                        break;
                    }
                }
                out.push(word);
            }
            c if c.is_whitespace() => {}
            c => out.push(c.to_string()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_numbered_as_confluents_message_indexes_count_them() {
        let proto = r#"
            syntax = "proto3";
            // message Commented { }
            package acme.v2;
            import "google/protobuf/timestamp.proto";
            /* message AlsoCommented {} */
            message First { string text = 1; }
            enum Kind { A = 0; B = 1; }
            message Second {
                message Inner { int32 x = 1; }
                oneof choice { string s = 1; int32 i = 2; }
                message Other { message Deep { } }
                string note = 3 [json_name = "message Fake {"];
            }
            service S { rpc Do(First) returns (Second); }
        "#;
        let messages = messages_of(proto);
        let expected: HashMap<String, String> = [
            ("0", "acme.v2.First"),
            ("1", "acme.v2.Second"),
            ("1:0", "acme.v2.Second.Inner"),
            ("1:1", "acme.v2.Second.Other"),
            ("1:1:0", "acme.v2.Second.Other.Deep"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(messages, expected);
        assert_eq!(index_key(&[]), "0");
        assert_eq!(index_key(&[1, 1, 0]), "1:1:0");
    }

    #[test]
    fn an_unreachable_registry_is_an_error_naming_it_and_is_not_asked_again_at_once() {
        let registry = SchemaRegistry::new("http://user:secret@127.0.0.1:9/").expect("a URL");
        let first = registry
            .message(5, "0")
            .expect_err("nothing listens on port 9");
        assert!(
            first.contains("127.0.0.1:9") && !first.contains("secret"),
            "{first}"
        );
        let started = Instant::now();
        assert_eq!(registry.message(5, "0").expect_err("remembered"), first);
        assert!(started.elapsed() < Duration::from_millis(50));
        assert!(SchemaRegistry::new("ftp://x").is_err());
    }
}
