//! What FHIR R4 (4.0.1) says about the resource types, as far as proving a
//! patient compartment from a request needs it: which types have a search
//! parameter that names the patient. Taken from the R4 search parameter
//! registry (`search-parameters.json`): a `patient` parameter whose target is
//! Patient, and a `subject` parameter that may target Patient.
//!
//! A server may ignore a search parameter it does not know (lenient
//! handling, the default), so `patient=` on a type without one would prove
//! nothing: these lists are what a compartment proof may rely on.

/// Types with a `patient` search parameter (its target: Patient).
pub const PATIENT_PARAM: [&str; 65] = [
    "Account",
    "AllergyIntolerance",
    "Appointment",
    "AppointmentResponse",
    "AuditEvent",
    "Basic",
    "BodyStructure",
    "CarePlan",
    "CareTeam",
    "ChargeItem",
    "Claim",
    "ClaimResponse",
    "ClinicalImpression",
    "Communication",
    "CommunicationRequest",
    "Composition",
    "Condition",
    "Consent",
    "Contract",
    "Coverage",
    "CoverageEligibilityRequest",
    "CoverageEligibilityResponse",
    "DetectedIssue",
    "Device",
    "DeviceRequest",
    "DeviceUseStatement",
    "DiagnosticReport",
    "DocumentManifest",
    "DocumentReference",
    "Encounter",
    "EnrollmentRequest",
    "EpisodeOfCare",
    "ExplanationOfBenefit",
    "FamilyMemberHistory",
    "Flag",
    "Goal",
    "GuidanceResponse",
    "ImagingStudy",
    "Immunization",
    "ImmunizationEvaluation",
    "ImmunizationRecommendation",
    "Invoice",
    "List",
    "MeasureReport",
    "Media",
    "MedicationAdministration",
    "MedicationDispense",
    "MedicationRequest",
    "MedicationStatement",
    "MolecularSequence",
    "NutritionOrder",
    "Observation",
    "Person",
    "Procedure",
    "Provenance",
    "QuestionnaireResponse",
    "RelatedPerson",
    "RequestGroup",
    "ResearchSubject",
    "RiskAssessment",
    "ServiceRequest",
    "Specimen",
    "SupplyDelivery",
    "Task",
    "VisionPrescription",
];

/// Types whose `subject` search parameter may target a Patient.
pub const SUBJECT_PARAM: [&str; 40] = [
    "Account",
    "AdverseEvent",
    "Basic",
    "CarePlan",
    "CareTeam",
    "ChargeItem",
    "ClinicalImpression",
    "Communication",
    "CommunicationRequest",
    "Composition",
    "Condition",
    "Contract",
    "DeviceRequest",
    "DeviceUseStatement",
    "DiagnosticReport",
    "DocumentManifest",
    "DocumentReference",
    "Encounter",
    "EnrollmentRequest",
    "Flag",
    "Goal",
    "GuidanceResponse",
    "ImagingStudy",
    "Invoice",
    "List",
    "MeasureReport",
    "Media",
    "MedicationAdministration",
    "MedicationDispense",
    "MedicationRequest",
    "MedicationStatement",
    "Observation",
    "Procedure",
    "QuestionnaireResponse",
    "RequestGroup",
    "RiskAssessment",
    "ServiceRequest",
    "Specimen",
    "SupplyRequest",
    "Task",
];

/// `kind` has a `patient` search parameter.
pub fn has_patient_param(kind: &str) -> bool {
    PATIENT_PARAM.binary_search(&kind).is_ok()
}

/// `kind`'s `subject` search parameter may name a Patient.
pub fn has_subject_param(kind: &str) -> bool {
    SUBJECT_PARAM.binary_search(&kind).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_are_sorted_for_binary_search() {
        for list in [&PATIENT_PARAM[..], &SUBJECT_PARAM[..]] {
            assert!(list.windows(2).all(|w| w[0] < w[1]), "{list:?}");
        }
    }

    #[test]
    fn known_members() {
        assert!(has_patient_param("Observation") && has_subject_param("Observation"));
        assert!(has_patient_param("Encounter") && has_patient_param("AllergyIntolerance"));
        // AdverseEvent and SupplyRequest name the patient only as `subject`.
        assert!(!has_patient_param("AdverseEvent") && has_subject_param("AdverseEvent"));
        // Not patient data: no parameter names a patient.
        for kind in [
            "Practitioner",
            "Organization",
            "Medication",
            "Location",
            "Patient",
            "Group",
        ] {
            assert!(
                !has_patient_param(kind) && !has_subject_param(kind),
                "{kind}"
            );
        }
    }
}
