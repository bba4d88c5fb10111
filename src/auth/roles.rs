//! Roles and the permission each grants, per action and resource type.
//!
//! A role is a duty, not a person: a token lists the roles of its subject, and a request is
//! allowed when any of them permits the action on the resource type.

/// What a request does to a resource type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Read, version read, search, history.
    Read,
    /// Create.
    Create,
    /// Update.
    Update,
    /// Delete (a retraction; versions stay in history).
    Delete,
    /// Read the audit trail of accesses.
    ViewAudit,
}

/// A duty that maps to permissions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Reads and writes all clinical data.
    Physician,
    /// Reads clinical data; records observations, immunizations and other bedside data.
    Nurse,
    /// Registers patients and encounters; reads the directory.
    FrontDesk,
    /// Reads demographics, coverage and claims; no clinical content.
    Billing,
    /// Reads the audit trail; no clinical content.
    ComplianceOfficer,
    /// Maintains the directory (organizations, practitioners, locations).
    Administrator,
}

/// Resource types outside every patient compartment, kept in the shared directory.
const DIRECTORY_TYPES: &[&str] = &[
    "Organization",
    "Practitioner",
    "PractitionerRole",
    "Location",
    "Medication",
    "Endpoint",
    "HealthcareService",
    "Substance",
];

/// Types a nurse may create and update.
const NURSE_WRITES: &[&str] = &[
    "Observation",
    "Immunization",
    "AllergyIntolerance",
    "MedicationAdministration",
    "Encounter",
    "Procedure",
    "DocumentReference",
];

/// Types the front desk may create, update and read.
const FRONT_DESK_TYPES: &[&str] = &["Patient", "Encounter", "Coverage", "Appointment"];

/// Types billing may read.
const BILLING_READS: &[&str] = &[
    "Patient",
    "Coverage",
    "Claim",
    "ExplanationOfBenefit",
    "Encounter",
    "Account",
];

/// Returns whether a resource type is kept in the shared directory.
pub fn is_directory_type(resource_type: &str) -> bool {
    DIRECTORY_TYPES.contains(&resource_type)
}

impl Role {
    /// Parses a role name as it appears in a token's `roles` claim.
    pub fn from_name(name: &str) -> Option<Role> {
        match name {
            "physician" => Some(Role::Physician),
            "nurse" => Some(Role::Nurse),
            "front-desk" => Some(Role::FrontDesk),
            "billing" => Some(Role::Billing),
            "compliance-officer" => Some(Role::ComplianceOfficer),
            "administrator" => Some(Role::Administrator),
            _ => None,
        }
    }

    /// Returns the role's name as written in tokens.
    pub fn name(self) -> &'static str {
        match self {
            Role::Physician => "physician",
            Role::Nurse => "nurse",
            Role::FrontDesk => "front-desk",
            Role::Billing => "billing",
            Role::ComplianceOfficer => "compliance-officer",
            Role::Administrator => "administrator",
        }
    }

    /// Returns the purpose of use (HL7 v3 PurposeOfUse) of the role's ordinary work.
    pub fn default_purpose(self) -> &'static str {
        match self {
            Role::Physician | Role::Nurse => "TREAT",
            Role::FrontDesk | Role::Administrator => "HOPERAT",
            Role::Billing => "HPAYMT",
            Role::ComplianceOfficer => "HOPERAT",
        }
    }

    /// Returns whether the role permits `action` on `resource_type`.
    pub fn permits(self, action: Action, resource_type: &str) -> bool {
        let directory = is_directory_type(resource_type);
        match (self, action) {
            (Role::Physician, Action::ViewAudit) => false,
            (Role::Physician, _) => true,
            (Role::Nurse, Action::Read) => true,
            (Role::Nurse, Action::Create | Action::Update) => NURSE_WRITES.contains(&resource_type),
            (Role::Nurse, _) => false,
            (Role::FrontDesk, Action::Read) => {
                directory || FRONT_DESK_TYPES.contains(&resource_type)
            }
            (Role::FrontDesk, Action::Create | Action::Update) => {
                FRONT_DESK_TYPES.contains(&resource_type)
            }
            (Role::FrontDesk, _) => false,
            (Role::Billing, Action::Read) => directory || BILLING_READS.contains(&resource_type),
            (Role::Billing, _) => false,
            (Role::ComplianceOfficer, Action::ViewAudit) => true,
            (Role::ComplianceOfficer, _) => false,
            (Role::Administrator, Action::ViewAudit) => false,
            (Role::Administrator, _) => directory,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn billing_cannot_read_clinical_notes() {
        assert!(Role::Billing.permits(Action::Read, "Coverage"));
        assert!(!Role::Billing.permits(Action::Read, "Observation"));
        assert!(!Role::Billing.permits(Action::Read, "DocumentReference"));
    }

    #[test]
    fn compliance_officer_reads_audit_not_charts() {
        assert!(Role::ComplianceOfficer.permits(Action::ViewAudit, "Patient"));
        assert!(!Role::ComplianceOfficer.permits(Action::Read, "Patient"));
    }

    #[test]
    fn nurse_cannot_delete_or_prescribe() {
        assert!(Role::Nurse.permits(Action::Create, "Observation"));
        assert!(!Role::Nurse.permits(Action::Create, "MedicationRequest"));
        assert!(!Role::Nurse.permits(Action::Delete, "Observation"));
    }

    #[test]
    fn role_names_round_trip() {
        for role in [
            Role::Physician,
            Role::Nurse,
            Role::FrontDesk,
            Role::Billing,
            Role::ComplianceOfficer,
            Role::Administrator,
        ] {
            assert_eq!(Role::from_name(role.name()), Some(role));
        }
    }
}
