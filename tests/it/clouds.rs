//! Azure Blob Storage repositories (issue 11) against Azurite, started by
//! scripts/test.sh: the backend conformance suite (plain and under the
//! fault injector), the archive round trip, racing pushes and the PITR suite, as on the S3
//! servers. What Azurite enforces of conditional writes is in
//! docs/testing.md, and why no GCS emulator runs here (none accepts the
//! XML-API uploads object_store's GCS client sends).

use crate::archive::{end_to_end, racing_pushes};
use crate::backends::{conformance_on, conformance_under_faults_on, require};
use crate::common::TestEnv;

#[test]
fn conformance_azurite() {
    let env = TestEnv::new();
    if let Some(s) = require(env.azurite.clone(), "PGVAULT_TEST_AZURITE") {
        conformance_on(&s);
    }
}

#[test]
fn conformance_azurite_under_faults() {
    let env = TestEnv::new();
    if let Some(s) = require(env.azurite.clone(), "PGVAULT_TEST_AZURITE") {
        conformance_under_faults_on(&s, 6);
    }
}

#[test]
fn archive_roundtrip_azurite() {
    let env = TestEnv::new();
    if let Some(s) = require(env.azurite.clone(), "PGVAULT_TEST_AZURITE") {
        let repo = env.s3_repo(&s, "main");
        end_to_end(&env, &repo, Some(1), 40);
    }
}

#[test]
fn racing_pushes_azurite() {
    let env = TestEnv::new();
    if let Some(s) = require(env.azurite.clone(), "PGVAULT_TEST_AZURITE") {
        racing_pushes(&s);
    }
}

#[test]
fn pitr_azurite() {
    let env = TestEnv::new();
    if let Some(s) = require(env.azurite.clone(), "PGVAULT_TEST_AZURITE") {
        let repo = env.s3_repo(&s, "pitr");
        crate::pitr::pitr_suite(&env, &repo, false);
    }
}
