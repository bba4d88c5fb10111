//! A check that a JSON document repeats no key within an object. serde_json keeps the last of
//! repeated keys silently; FHIR's JSON format allows each property once, so a request that
//! repeats one is rejected rather than stored with one of its values dropped.

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// Most nesting accepted, as serde_json's own parser limit (128), so the check fails no
/// document that the parser accepts.
const MAX_DEPTH: usize = 128;

/// Marker that a document passed the check; deserializing it fails at the first repeated key.
pub struct NoDuplicateKeys;

struct Walker {
    depth: usize,
}

impl<'de> de::DeserializeSeed<'de> for Walker {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walker {
    type Value = ();

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<(), A::Error> {
        let depth = self.depth + 1;
        if depth > MAX_DEPTH {
            return Err(de::Error::custom("JSON nested too deeply"));
        }
        while items.next_element_seed(Walker { depth })?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut entries: A) -> Result<(), A::Error> {
        let depth = self.depth + 1;
        if depth > MAX_DEPTH {
            return Err(de::Error::custom("JSON nested too deeply"));
        }
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = entries.next_key::<String>()? {
            entries.next_value_seed(Walker { depth })?;
            if !seen.insert(key) {
                // The key itself may be client text, so the message does not repeat it.
                return Err(de::Error::custom("an object repeats a property name"));
            }
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for NoDuplicateKeys {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(Walker { depth: 0 })?;
        Ok(NoDuplicateKeys)
    }
}

/// Checks that no object in `body` repeats a key. `body` must already parse as JSON.
///
/// # Errors
///
/// The parser's error, whose message says that a property name is repeated and whose line
/// and column locate it.
pub fn check_no_duplicate_keys(body: &[u8]) -> Result<(), serde_json::Error> {
    serde_json::from_slice::<NoDuplicateKeys>(body).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_key_is_found_at_any_depth() {
        assert!(check_no_duplicate_keys(br#"{"a":1,"b":{"c":[{"d":1,"d":2}]}}"#).is_err());
        assert!(check_no_duplicate_keys(br#"{"gender":"male","gender":"female"}"#).is_err());
    }

    #[test]
    fn distinct_keys_pass() {
        assert!(check_no_duplicate_keys(br#"{"a":1,"b":{"a":[{"a":1}],"c":null}}"#).is_ok());
        assert!(check_no_duplicate_keys(b"[1, 2.50, true, \"x\"]").is_ok());
    }
}
