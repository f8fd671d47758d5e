"""Lab results across vendors: HL7 v2 parsing (hl7), the lab_observations table (observations),
the FHIR R4 export (fhir). Issue 26."""
