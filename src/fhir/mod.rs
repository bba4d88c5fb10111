//! FHIR R4 knowledge: structural validation, the Patient compartment, reference walking and
//! search. Everything here works on `serde_json::Value` and does no IO.
//!
//! The tables come from the official R4 (4.0.1) definitions; `schemas/fhir-r4/` says how they
//! were generated.

pub mod compartment;
pub mod datetime;
pub mod definitions;
pub mod search;
pub mod validate;
