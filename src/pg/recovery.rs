//! Recovery configuration (PostgreSQL 12+): `recovery.signal` /
//! `standby.signal` plus settings in `postgresql.auto.conf`, and the
//! `backup_label` returned by the backup stop call.
//!
//! Settings follow "Archive Recovery" and "Recovery Target" in the server
//! configuration chapter. Earlier recovery settings in
//! `postgresql.auto.conf` are commented out: a stale `recovery_target_*`
//! would stop recovery at an old target, or make PostgreSQL refuse to start
//! with "multiple recovery targets specified".

use chrono::{DateTime, NaiveDateTime, Utc};

use super::{Lsn, TimelineId};

/// A recovery setting or `backup_label` that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RecoveryError(pub String);

type Result<T> = std::result::Result<T, RecoveryError>;

/// Archive recovery: recover, then promote (or pause, or shut down).
pub const RECOVERY_SIGNAL: &str = "recovery.signal";
/// Standby mode: keep replaying (from the archive or a primary).
pub const STANDBY_SIGNAL: &str = "standby.signal";
pub const BACKUP_LABEL: &str = "backup_label";
pub const TABLESPACE_MAP: &str = "tablespace_map";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoveryTarget {
    Immediate,
    Time(DateTime<Utc>),
    Lsn(Lsn),
    Xid(String),
    Name(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetAction {
    Pause,
    Promote,
    Shutdown,
}

impl TargetAction {
    pub fn as_str(self) -> &'static str {
        match self {
            TargetAction::Pause => "pause",
            TargetAction::Promote => "promote",
            TargetAction::Shutdown => "shutdown",
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct RecoverySettings {
    pub restore_command: String,
    pub target: Option<RecoveryTarget>,
    pub target_action: Option<TargetAction>,
    /// `latest`, `current` or a number, as PostgreSQL takes it.
    pub target_timeline: Option<String>,
    pub target_exclusive: bool,
    pub archive_mode_off: bool,
    pub primary_conninfo: Option<String>,
}

/// Keys pgvault owns in `postgresql.auto.conf` after a restore.
const OWNED_KEYS: &[&str] = &[
    "restore_command",
    "recovery_target",
    "recovery_target_time",
    "recovery_target_lsn",
    "recovery_target_xid",
    "recovery_target_name",
    "recovery_target_action",
    "recovery_target_timeline",
    "recovery_target_inclusive",
];

/// Starts the block of settings a restore writes.
const MARKER: &str = "# recovery settings written by pgvault restore";

/// A value as a quoted configuration string.
pub fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// Formats a time the way recovery_target_time takes it, in UTC.
pub fn format_target_time(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string()
}

/// The transaction a `recovery_target_xid` setting names, read as
/// PostgreSQL's `check_recovery_target_xid` reads it: `strtou64(value,
/// NULL, 0)` — leading blanks, a sign, `0x` hex or `0`
/// octal, digits up to the first other character (none gives 0, as glibc
/// returns) — then cast to a 32-bit `TransactionId`, which keeps the low
/// half of a `pg_current_xact_id()` value. `None` where PostgreSQL refuses
/// the setting: a value past 64 bits.
pub fn target_xid(value: &str) -> Option<u32> {
    let s = value.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let (negative, s) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let lower = s.to_ascii_lowercase();
    let (radix, digits) =
        if lower.starts_with("0x") && lower[2..].starts_with(|c: char| c.is_ascii_hexdigit()) {
            (16, &s[2..])
        } else if s.starts_with('0') {
            (8, s)
        } else {
            (10, s)
        };
    let mut v: u64 = 0;
    for c in digits.chars() {
        let Some(d) = c.to_digit(radix) else {
            break;
        };
        v = v.checked_mul(u64::from(radix))?.checked_add(u64::from(d))?;
    }
    let v = if negative { v.wrapping_neg() } else { v };
    Some(v as u32)
}

/// Parses RFC 3339 (`2026-11-26T03:15:00Z`) or PostgreSQL's own form
/// (`2026-11-26 03:15:00.123456+01`, `… +05:30`, `… UTC`). A time without a
/// zone is refused: guessing the zone during a disaster is how PITR lands an
/// hour off.
pub fn parse_target_time(s: &str) -> Result<DateTime<Utc>> {
    let t = s.trim();
    if let Ok(d) = DateTime::parse_from_rfc3339(t) {
        return Ok(d.with_timezone(&Utc));
    }
    for utc in [" UTC", " utc", "Z", " Z"] {
        if let Some(rest) = t.strip_suffix(utc) {
            for fmt in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
                if let Ok(n) = NaiveDateTime::parse_from_str(rest.trim(), fmt) {
                    return Ok(n.and_utc());
                }
            }
        }
    }
    for fmt in [
        "%Y-%m-%d %H:%M:%S%.f%#z",
        "%Y-%m-%dT%H:%M:%S%.f%#z",
        "%Y-%m-%d %H:%M:%S%.f %#z",
    ] {
        if let Ok(d) = DateTime::parse_from_str(t, fmt) {
            return Ok(d.with_timezone(&Utc));
        }
    }
    if NaiveDateTime::parse_from_str(t, "%Y-%m-%d %H:%M:%S%.f").is_ok() {
        return Err(RecoveryError(format!(
            "time {s:?} has no time zone: add one, e.g. \"{t}+00\" or \"{t} UTC\""
        )));
    }
    Err(RecoveryError(format!(
        "time {s:?} is not RFC 3339 (2026-11-26T03:15:00Z) or YYYY-MM-DD HH:MM:SS[.ffffff]±TZ"
    )))
}

/// The settings block appended to `postgresql.auto.conf`.
pub fn settings_lines(s: &RecoverySettings) -> Vec<(String, String)> {
    let mut v = vec![("restore_command".to_string(), s.restore_command.clone())];
    if let Some(t) = &s.target {
        let (k, val) = match t {
            RecoveryTarget::Immediate => ("recovery_target", "immediate".to_string()),
            RecoveryTarget::Time(t) => ("recovery_target_time", format_target_time(t)),
            RecoveryTarget::Lsn(l) => ("recovery_target_lsn", l.to_string()),
            RecoveryTarget::Xid(x) => ("recovery_target_xid", x.clone()),
            RecoveryTarget::Name(n) => ("recovery_target_name", n.clone()),
        };
        v.push((k.to_string(), val));
        if s.target_exclusive && !matches!(t, RecoveryTarget::Immediate) {
            v.push(("recovery_target_inclusive".into(), "false".into()));
        }
    }
    if let Some(a) = s.target_action {
        v.push(("recovery_target_action".into(), a.as_str().into()));
    }
    if let Some(tl) = &s.target_timeline {
        v.push(("recovery_target_timeline".into(), tl.clone()));
    }
    if s.archive_mode_off {
        v.push(("archive_mode".into(), "off".into()));
    }
    if let Some(c) = &s.primary_conninfo {
        v.push(("primary_conninfo".into(), c.clone()));
    }
    v
}

/// Rewrites `postgresql.auto.conf`: comments out earlier recovery settings
/// (and any setting pgvault is about to write), then appends ours.
pub fn rewrite_auto_conf(existing: &str, s: &RecoverySettings, stamp: &str) -> String {
    let lines = settings_lines(s);
    let mut out = String::with_capacity(existing.len() + 512);
    // Inside an earlier restore's block, its archive_mode and
    // primary_conninfo lines are pgvault's too, and go as well.
    let mut in_our_block = false;
    for line in existing.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with(MARKER) {
            in_our_block = true;
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let key = trimmed
            .split(|c: char| c == '=' || c.is_whitespace())
            .next()
            .unwrap_or("")
            .to_ascii_lowercase();
        let block_key = key == "archive_mode"
            || key == "primary_conninfo"
            || OWNED_KEYS.contains(&key.as_str());
        in_our_block = in_our_block && block_key;
        let owned = !trimmed.starts_with('#')
            && (OWNED_KEYS.contains(&key.as_str())
                || in_our_block
                || lines.iter().any(|(k, _)| *k == key));
        if owned {
            out.push_str("# removed by pgvault restore: ");
        }
        out.push_str(line);
        out.push('\n');
    }
    out.push_str(&format!("{MARKER}, {stamp}\n"));
    for (k, v) in lines {
        out.push_str(&format!("{k} = {}\n", quote(&v)));
    }
    out
}

/// What pgvault needs from a `backup_label`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupLabel {
    pub start_lsn: Lsn,
    pub checkpoint_lsn: Option<Lsn>,
    pub start_timeline: TimelineId,
    pub label: String,
}

/// Parses the `backup_label` text (do_pg_backup_start in xlog.c writes it).
pub fn parse_backup_label(text: &str) -> Result<BackupLabel> {
    let field = |name: &str| -> Option<&str> {
        text.lines().find_map(|l| {
            l.strip_prefix(name)
                .map(|r| r.trim_start_matches(':').trim())
        })
    };
    let lsn_of = |v: &str| -> Option<Lsn> { v.split_whitespace().next()?.parse().ok() };
    let start_lsn = field("START WAL LOCATION")
        .and_then(lsn_of)
        .ok_or_else(|| RecoveryError("backup_label has no valid START WAL LOCATION".into()))?;
    let start_timeline = field("START TIMELINE")
        .and_then(|v| v.parse::<u32>().ok())
        .map(TimelineId)
        .ok_or_else(|| RecoveryError("backup_label has no valid START TIMELINE".into()))?;
    Ok(BackupLabel {
        start_lsn,
        checkpoint_lsn: field("CHECKPOINT LOCATION").and_then(lsn_of),
        start_timeline,
        label: field("LABEL").unwrap_or("").to_string(),
    })
}

/// Checks a backup history file (`<segment>.<offset>.backup`, which
/// `do_pg_backup_stop` writes into pg_wal and the archiver archives): it
/// names where the backup started, like a `backup_label`.
pub fn check_backup_history(text: &str) -> Result<()> {
    let start = text
        .lines()
        .find_map(|l| l.strip_prefix("START WAL LOCATION:"));
    match start.and_then(|v| v.split_whitespace().next()?.parse::<Lsn>().ok()) {
        Some(_) => Ok(()),
        None => Err(RecoveryError(
            "not a backup history file: no valid START WAL LOCATION line".into(),
        )),
    }
}

/// The `tablespace_map` to restore: lines are `<oid> <path>`, and a
/// tablespace restored elsewhere (`--tablespace-map OID=DIR`) gets its new
/// location, from which PostgreSQL recreates the `pg_tblspc` links.
pub fn remap_tablespace_map(
    text: &str,
    map: &std::collections::BTreeMap<u32, std::path::PathBuf>,
) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let (oid, path) = line.split_once(' ').unwrap_or((line, ""));
        match oid.parse::<u32>().ok().and_then(|o| map.get(&o)) {
            Some(p) => out.push_str(&format!("{oid} {}\n", p.display())),
            None => out.push_str(&format!("{oid} {path}\n")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_xid_as_postgresql_reads_it() {
        assert_eq!(target_xid("745"), Some(745));
        assert_eq!(target_xid("  745"), Some(745));
        assert_eq!(target_xid("0x2e9"), Some(745));
        assert_eq!(target_xid("01351"), Some(745));
        // pg_current_xact_id() of epoch 1: the low 32 bits.
        assert_eq!(target_xid("4294968041"), Some(745));
        assert_eq!(target_xid("745abc"), Some(745));
        assert_eq!(target_xid("abc"), Some(0));
        assert_eq!(target_xid("-1"), Some(u32::MAX));
        assert_eq!(target_xid("99999999999999999999"), None);
    }

    #[test]
    fn parses_times() {
        let want = DateTime::parse_from_rfc3339("2026-11-26T03:15:00.5Z")
            .unwrap()
            .with_timezone(&Utc);
        for s in [
            "2026-11-26T03:15:00.5Z",
            "2026-11-26T04:15:00.5+01:00",
            "2026-11-26 04:15:00.500000+01",
            "2026-11-26 04:15:00.5+0100",
            "2026-11-26 03:15:00.5 UTC",
            "2026-11-25 22:45:00.5-04:30",
        ] {
            assert_eq!(parse_target_time(s).unwrap(), want, "{s}");
        }
        let e = parse_target_time("2026-11-26 03:15:00")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no time zone"), "{e}");
        assert!(parse_target_time("yesterday").is_err());
        assert_eq!(format_target_time(&want), "2026-11-26 03:15:00.500000+00");
    }

    #[test]
    fn comments_out_stale_settings() {
        let old = "# Do not edit this file manually!\nwork_mem = '8MB'\nrestore_command = 'cp /old/%f %p'\nrecovery_target_time = '2020-01-01 00:00:00+00'\nRecovery_Target_Name='x'\n";
        let s = RecoverySettings {
            restore_command: "pgvault archive-get %f \"%p\"".into(),
            target: Some(RecoveryTarget::Lsn(Lsn(0x1_0000_0028))),
            target_action: Some(TargetAction::Promote),
            target_timeline: Some("latest".into()),
            archive_mode_off: true,
            ..Default::default()
        };
        let out = rewrite_auto_conf(old, &s, "now");
        assert!(out.contains("work_mem = '8MB'\n"));
        assert!(out.contains("# removed by pgvault restore: restore_command = 'cp /old/%f %p'"));
        assert!(out.contains("# removed by pgvault restore: recovery_target_time"));
        assert!(out.contains("# removed by pgvault restore: Recovery_Target_Name"));
        assert!(out.ends_with(
            "restore_command = 'pgvault archive-get %f \"%p\"'\nrecovery_target_lsn = '1/28'\nrecovery_target_action = 'promote'\nrecovery_target_timeline = 'latest'\narchive_mode = 'off'\n"
        ));
        // a second restore comments out the first one's settings
        let again = rewrite_auto_conf(
            &out,
            &RecoverySettings {
                restore_command: "x".into(),
                ..Default::default()
            },
            "later",
        );
        assert_eq!(again.matches("\nrecovery_target_lsn").count(), 0);
        assert_eq!(again.matches("\narchive_mode").count(), 0);
        assert!(again.ends_with("restore_command = 'x'\n"));
    }

    #[test]
    fn parses_backup_label() {
        let text = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nCHECKPOINT LOCATION: 0/2000060\nBACKUP METHOD: streamed\nBACKUP FROM: primary\nSTART TIME: 2026-11-26 10:00:00 UTC\nLABEL: pgvault 20261126-100000F\nSTART TIMELINE: 3\n";
        let l = parse_backup_label(text).unwrap();
        assert_eq!(l.start_lsn, Lsn(0x2000028));
        assert_eq!(l.checkpoint_lsn, Some(Lsn(0x2000060)));
        assert_eq!(l.start_timeline, TimelineId(3));
        assert_eq!(l.label, "pgvault 20261126-100000F");
        assert!(parse_backup_label("garbage").is_err());
        assert!(check_backup_history(text).is_ok());
        assert!(check_backup_history("START WAL LOCATION: nonsense\n").is_err());
    }

    #[test]
    fn remaps_tablespaces() {
        let map = std::collections::BTreeMap::from([(16385, std::path::PathBuf::from("/new/ts"))]);
        assert_eq!(
            remap_tablespace_map("16385 /old/ts\n16386 /other path\n", &map),
            "16385 /new/ts\n16386 /other path\n"
        );
    }
}
