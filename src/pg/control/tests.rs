use std::collections::BTreeSet;

use super::*;
use crate::pg::testdata;

/// Every pg_control in the fixtures with its pg_controldata facts.
fn fixture_controls() -> Vec<(String, u32, serde_json::Value, Vec<u8>)> {
    let mut out = Vec::new();
    for (dir, major) in testdata::MAJORS {
        let facts = testdata::facts(dir);
        for (file, cd) in facts["control_files"].as_object().unwrap() {
            let rel = format!("{dir}/{file}");
            out.push((rel.clone(), *major, cd.clone(), testdata::read(&rel)));
        }
    }
    out
}

fn lsn(v: &serde_json::Value) -> Lsn {
    v.as_str().unwrap().parse().unwrap()
}

/// pg_controldata prints times with strftime("%c"); the fixture script ran
/// it with LC_ALL=C and TZ=UTC.
fn controldata_time(s: &str) -> i64 {
    chrono::NaiveDateTime::parse_from_str(s, "%a %b %e %H:%M:%S %Y")
        .unwrap_or_else(|e| panic!("{s:?}: {e}"))
        .and_utc()
        .timestamp()
}

#[test]
fn every_field_of_every_layout_matches_pg_controldata() {
    let mut versions = BTreeSet::new();
    let mut states = BTreeSet::new();
    let controls = fixture_controls();
    assert!(controls.len() >= 10);
    for (rel, major, cd, bytes) in controls {
        let c = parse_control_file(&bytes).unwrap_or_else(|e| panic!("{rel}: {e}"));
        let raw = &cd["pg_controldata"];
        versions.insert(c.pg_control_version);
        states.insert(c.state.to_string());

        assert_eq!(
            c.system_identifier.to_string(),
            cd["system_identifier"],
            "{rel}"
        );
        assert_eq!(
            u64::from(c.pg_control_version),
            cd["pg_control_version"],
            "{rel}"
        );
        assert_eq!(
            u64::from(c.catalog_version_no),
            cd["catalog_version_no"],
            "{rel}"
        );
        assert_eq!(c.state.to_string(), cd["state"], "{rel}");
        assert_eq!(c.checkpoint, lsn(&cd["checkpoint"]), "{rel}");
        assert_eq!(c.redo, lsn(&cd["redo"]), "{rel}");
        assert_eq!(u64::from(c.timeline.0), cd["timeline"], "{rel}");
        assert_eq!(u64::from(c.prev_timeline.0), cd["prev_timeline"], "{rel}");
        assert_eq!(
            c.checkpoint_time,
            cd["checkpoint_time"].as_i64().unwrap(),
            "{rel}"
        );
        assert_eq!(
            c.last_modified,
            controldata_time(raw["pg_control last modified"].as_str().unwrap()),
            "{rel}"
        );
        assert_eq!(
            c.min_recovery_point,
            lsn(&cd["min_recovery_point"]),
            "{rel}"
        );
        assert_eq!(
            c.min_recovery_point_timeline.0.to_string(),
            raw["Min recovery ending loc's timeline"],
            "{rel}"
        );
        assert_eq!(
            c.backup_start_point,
            lsn(&cd["backup_start_point"]),
            "{rel}"
        );
        assert_eq!(c.backup_end_point, lsn(&cd["backup_end_point"]), "{rel}");
        assert_eq!(c.backup_end_required, cd["backup_end_required"], "{rel}");
        assert_eq!(
            wal_level_name(c.wal_level).unwrap(),
            cd["wal_level"],
            "{rel}"
        );
        assert_eq!(u64::from(c.block_size), cd["block_size"], "{rel}");
        assert_eq!(u64::from(c.wal_block_size), cd["wal_block_size"], "{rel}");
        assert_eq!(
            u64::from(c.wal_segment_size),
            cd["wal_segment_size"],
            "{rel}"
        );
        assert_eq!(
            u64::from(c.data_checksum_version),
            cd["data_checksum_version"],
            "{rel}"
        );
        assert_eq!(
            hex::encode(c.mock_authentication_nonce),
            raw["Mock authentication nonce"],
            "{rel}"
        );
        match raw.get("Default char data signedness") {
            Some(s) => assert_eq!(c.default_char_signed, Some(s == "signed"), "{rel}"),
            None => assert_eq!(c.default_char_signed, None, "{rel}"),
        }

        assert_eq!(
            major_from_catalog_version(c.catalog_version_no),
            Some(major),
            "{rel}"
        );
        assert!(majors_for_control_version(c.pg_control_version)
            .unwrap()
            .contains(&major));
        check_versions_agree(major, &c).unwrap();
    }
    assert_eq!(versions, BTreeSet::from([1300, 1700, 1800]));
    // the PostgreSQL 15 fixtures cover every state a copied pg_control shows
    for s in [
        "shut down",
        "shut down in recovery",
        "in archive recovery",
        "in production",
    ] {
        assert!(states.contains(s), "no fixture in state {s:?}");
    }
}

#[test]
fn fields_that_are_often_zero_are_read_from_where_postgresql_writes_them() {
    // Fixtures where pg_controldata shows non-zero values, so an offset that
    // is wrong but lands on zeros cannot pass.
    let c = parse_control_file(&testdata::read("pg15/pg_control.backup-recovering")).unwrap();
    assert_eq!(c.state, DbState::InArchiveRecovery);
    assert!(c.backup_start_point.is_valid());
    assert!(c.backup_end_point.is_valid());
    assert!(c.backup_end_required);
    assert!(c.min_recovery_point.is_valid());
    assert_eq!(c.min_recovery_point_timeline, TimelineId(1));

    let c = parse_control_file(&testdata::read("pg15/pg_control.promoted-stopped")).unwrap();
    assert_eq!(c.timeline, TimelineId(2));
    assert_eq!(c.state, DbState::Shutdowned);

    let c = parse_control_file(&testdata::read("pg15-16mib/pg_control")).unwrap();
    assert_eq!(c.wal_segment_size, 16 << 20);
    assert_eq!(c.data_checksum_version, 0);
    let c = parse_control_file(&testdata::read("pg15/pg_control")).unwrap();
    assert_eq!(c.wal_segment_size, 1 << 20);
    assert_eq!(c.data_checksum_version, 1);
}

#[test]
fn crc_is_checked_where_each_layout_keeps_it() {
    for (rel, _, _, bytes) in fixture_controls() {
        let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
        let crc_at = if version == 1800 { 292 } else { 288 };
        // any byte the CRC covers
        for off in [0, 20, 100, 200, crc_at - 1] {
            let mut bad = bytes.clone();
            bad[off] ^= 0x01;
            let e = parse_control_file(&bad).unwrap_err();
            assert!(
                matches!(e, PgError::ControlCrc { .. }),
                "{rel} @{off}: {e:?}"
            );
        }
        // the CRC itself
        let mut bad = bytes.clone();
        bad[crc_at] ^= 0x80;
        assert!(matches!(
            parse_control_file(&bad),
            Err(PgError::ControlCrc { .. })
        ));
        // bytes past the struct are padding the CRC does not cover
        let mut padded = bytes.clone();
        padded[4000] = 0xFF;
        assert!(parse_control_file(&padded).is_ok(), "{rel}");
        // only the struct is needed, not the whole 8 KiB
        assert!(parse_control_file(&bytes[..crc_at + 4]).is_ok(), "{rel}");
        assert_eq!(
            parse_control_file(&bytes[..crc_at + 3]).unwrap_err(),
            PgError::Truncated {
                what: "pg_control",
                need: crc_at + 4,
                got: crc_at + 3
            }
        );
    }
}

#[test]
fn a_1700_file_read_as_1800_or_back_fails_its_crc() {
    let mut b17 = testdata::read("pg17/pg_control");
    b17[8..12].copy_from_slice(&1800u32.to_le_bytes());
    assert!(matches!(
        parse_control_file(&b17),
        Err(PgError::ControlCrc { .. })
    ));
    let mut b18 = testdata::read("pg18/pg_control");
    b18[8..12].copy_from_slice(&1700u32.to_le_bytes());
    assert!(matches!(
        parse_control_file(&b18),
        Err(PgError::ControlCrc { .. })
    ));
}

#[test]
fn refuses_unknown_versions_short_files_and_big_endian() {
    let mut b = testdata::read("pg16/pg_control");
    b[8..12].copy_from_slice(&1201u32.to_le_bytes());
    assert_eq!(
        parse_control_file(&b).unwrap_err().to_string(),
        "pg_control version 1201 is not one pgvault reads (1300 is PostgreSQL 14 to 16, 1700 is 17, 1800 is 18)"
    );
    b[8..12].copy_from_slice(&1300u32.to_be_bytes());
    assert_eq!(
        parse_control_file(&b).unwrap_err(),
        PgError::BigEndian { what: "pg_control" }
    );
    assert_eq!(
        parse_control_file(&[0u8; 11]).unwrap_err().to_string(),
        "pg_control needs 12 bytes, got 11"
    );
    assert!(matches!(
        parse_control_file(&[0u8; 8192]),
        Err(PgError::UnknownControlVersion { version: 0 })
    ));
}

#[test]
fn float_format_guards_the_layout() {
    // A file whose CRC is right but whose floatFormat is not 1234567.0 is
    // not a layout pgvault knows (or was written by a different ABI).
    let mut b = testdata::read("pg15/pg_control");
    b[208..216].copy_from_slice(&1.5f64.to_le_bytes());
    let crc = crc32c::crc32c(&b[..288]);
    b[288..292].copy_from_slice(&crc.to_le_bytes());
    assert_eq!(
        parse_control_file(&b).unwrap_err(),
        PgError::ControlFloatFormat {
            found: "1.5".to_string()
        }
    );
}

#[test]
fn catalog_versions() {
    assert_eq!(major_from_catalog_version(202107181), Some(14));
    assert_eq!(major_from_catalog_version(202007202), Some(14));
    assert_eq!(major_from_catalog_version(202107182), Some(15));
    assert_eq!(major_from_catalog_version(202209061), Some(15));
    assert_eq!(major_from_catalog_version(202307071), Some(16));
    assert_eq!(major_from_catalog_version(202406281), Some(17));
    assert_eq!(major_from_catalog_version(202506291), Some(18));
    assert_eq!(major_from_catalog_version(202007201), None, "13");
    assert_eq!(major_from_catalog_version(201909212), None, "12");
    assert_eq!(major_from_catalog_version(202506292), None, "19 devel");
    assert_eq!(major_from_catalog_version(0), None);
}

#[test]
fn db_states_and_wal_levels() {
    let words: Vec<String> = (0..8).map(|v| DbState::from_u32(v).to_string()).collect();
    assert_eq!(
        words,
        [
            "starting up",
            "shut down",
            "shut down in recovery",
            "shutting down",
            "in crash recovery",
            "in archive recovery",
            "in production",
            "unrecognized status code 7",
        ]
    );
    assert!(DbState::Shutdowned.is_shut_down());
    assert!(DbState::ShutdownedInRecovery.is_shut_down());
    assert!(!DbState::InProduction.is_shut_down());
    assert_eq!(wal_level_name(1), Some("replica"));
    assert_eq!(wal_level_name(2), Some("logical"));
    assert_eq!(wal_level_name(0), Some("minimal"));
    assert_eq!(wal_level_name(3), None);
}

fn data_dir(pg_version: &str, control: &[u8]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("PG_VERSION"), pg_version).unwrap();
    std::fs::create_dir(d.path().join("global")).unwrap();
    std::fs::write(d.path().join("global/pg_control"), control).unwrap();
    d
}

#[test]
fn reads_a_data_directory() {
    for (dir, major) in testdata::MAJORS {
        let d = data_dir(
            &testdata::read_text(&format!("{dir}/PG_VERSION")),
            &testdata::read(&format!("{dir}/pg_control")),
        );
        let info = read_cluster_info(d.path()).unwrap();
        assert_eq!(info.major, *major);
        let facts = testdata::facts(dir);
        assert_eq!(
            info.control.system_identifier.to_string(),
            facts["control_files"]["pg_control"]["system_identifier"]
        );
    }
}

#[test]
fn data_directory_errors_name_the_file() {
    let d = tempfile::tempdir().unwrap();
    let e = read_cluster_info(d.path()).unwrap_err();
    let pg_version = d.path().join("PG_VERSION");
    assert!(matches!(&e, ClusterInfoError::Io { path, .. } if *path == pg_version));
    assert!(
        e.to_string()
            .starts_with(&format!("read {}: ", pg_version.display())),
        "{e}"
    );

    std::fs::write(&pg_version, "9.6\n").unwrap();
    let e = read_cluster_info(d.path()).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "read {}: PG_VERSION holds \"9.6\": PostgreSQL 9.6 is not supported (pgvault supports 14 to 18)",
            pg_version.display()
        )
    );

    std::fs::write(&pg_version, "15\n").unwrap();
    let e = read_cluster_info(d.path()).unwrap_err();
    assert!(matches!(&e, ClusterInfoError::Io { path, .. } if path.ends_with("global/pg_control")));

    let mut corrupt = testdata::read("pg15/pg_control");
    corrupt[0] ^= 1;
    let d = data_dir("15\n", &corrupt);
    let e = read_cluster_info(d.path()).unwrap_err();
    let control = d.path().join("global").join("pg_control");
    assert!(
        e.to_string().starts_with(&format!(
            "read {}: pg_control CRC mismatch",
            control.display()
        )),
        "{e}"
    );

    // PG_VERSION and pg_control of different majors
    let d = data_dir("16\n", &testdata::read("pg15/pg_control"));
    let e = read_cluster_info(d.path()).unwrap_err();
    assert!(
        e.to_string()
            .ends_with("catalog version 202209061 is PostgreSQL 15's, but PG_VERSION says 16"),
        "{e}"
    );
    let d = data_dir("16\n", &testdata::read("pg17/pg_control"));
    let e = read_cluster_info(d.path()).unwrap_err();
    assert!(
        e.to_string()
            .ends_with("pg_control version 1700 is not PostgreSQL 16's, though PG_VERSION says 16"),
        "{e}"
    );
}
