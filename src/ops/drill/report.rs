//! What a drill reports: every phase measured, every check's result, the
//! RTO and RPO achieved against their objectives, and what failed.

use serde::Serialize;

use crate::error::Kind;
use crate::repo::results::{DrillRecord, PhaseRecord, RESULT_FORMAT};

/// Bumped when a field changes meaning or disappears (adding fields does not).
pub const DRILL_SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize)]
pub struct DrillReport {
    pub schema_version: u32,
    pub stanza: String,
    pub repository: String,
    pub host: String,
    /// UTC, RFC 3339.
    pub started_at: String,
    pub finished_at: String,
    /// Every step worked, every check passed, every objective was met.
    pub passed: bool,
    /// What the command exits with (docs/exit-codes.md): 0, the failed
    /// step's code, 14 for a failed check, 13 for a missed objective.
    pub exit_code: i32,
    pub backup: Option<BackupFacts>,
    /// The recovery target PostgreSQL was given.
    pub target: Option<String>,
    /// The newest commit (or abort, or restore point) archived when the
    /// drill started, on the newest backup's replay path.
    pub newest_archived_commit: Option<String>,
    /// The newest commit the recovered cluster holds
    /// (`pg_last_xact_replay_timestamp()`, else the backup's end).
    pub recovered_to: Option<String>,
    /// Restore start to consistent and promoted.
    pub rto_seconds: Option<f64>,
    /// `newest_archived_commit` minus `recovered_to`: the archived commits
    /// a restore like this one does not bring back.
    pub rpo_seconds: Option<f64>,
    pub rto_objective_seconds: Option<f64>,
    pub rpo_objective_seconds: Option<f64>,
    /// Both objectives (those given) were met.
    pub objectives_met: bool,
    pub space: Option<Space>,
    pub phases: Vec<Phase>,
    /// WAL bytes replayed (redo start to redo end).
    pub replay_bytes: Option<u64>,
    pub server: Option<ServerFacts>,
    pub checks: Vec<CheckResult>,
    pub failures: Vec<Failure>,
    /// The scratch directory, and whether it was kept (`--keep`).
    pub scratch_dir: Option<String>,
    pub kept: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct BackupFacts {
    pub label: String,
    pub stop_time: String,
    pub stop_lsn: String,
    pub original_size: u64,
    pub pg_version: u32,
    /// Pages the backup itself found failing their checksum as it read
    /// them ("file (fork) block N").
    pub bad_pages_at_backup: Vec<String>,
}

/// The scratch directory's file system, checked before anything is
/// written.
#[derive(Debug, Clone, Serialize)]
pub struct Space {
    pub needed_bytes: u64,
    pub available_bytes: u64,
    pub backup_bytes: u64,
    pub wal_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    /// `plan`, `restore`, `start-up`, `replay`, `promotion` (or `recovery`
    /// when the server's log does not tell them apart), `amcheck`,
    /// `user-checks`, `relation-read`, `shutdown`, `page-checksums`.
    pub name: String,
    pub seconds: f64,
    pub bytes: Option<u64>,
    pub bytes_per_second: Option<f64>,
}

impl Phase {
    pub fn new(name: &str, seconds: f64, bytes: Option<u64>) -> Phase {
        Phase {
            name: name.into(),
            seconds,
            bytes,
            bytes_per_second: bytes.filter(|_| seconds > 0.0).map(|b| b as f64 / seconds),
        }
    }
}

/// The scratch server, as it ran: what it read its settings back as.
#[derive(Debug, Clone, Serialize)]
pub struct ServerFacts {
    pub version: String,
    pub bin_dir: String,
    pub os_user: String,
    pub role: String,
    pub socket_dir: String,
    /// `SHOW listen_addresses`: empty, no TCP listener.
    pub listen_addresses: String,
    pub archive_mode: String,
    pub data_checksums: bool,
    pub databases: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    /// `pg_amcheck`, `page checksums`, `relation read`, `user check "…"`.
    pub name: String,
    pub passed: bool,
    pub seconds: f64,
    /// What it checked, or what failed (one line each).
    pub detail: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    /// The step: `plan`, `binaries`, `space`, `restore`, `recovery`,
    /// `amcheck`, `page-checksums`, `relation-read`, `user-check`,
    /// `shutdown`, `objectives`.
    pub step: String,
    pub message: String,
    pub hint: Option<String>,
    #[serde(skip)]
    pub kind: Kind,
}

impl DrillReport {
    /// The exit code: the first failed step's, else 13 for a missed
    /// objective, else 0.
    pub fn decide(&mut self) {
        self.objectives_met = met(self.rto_seconds, self.rto_objective_seconds)
            && met(self.rpo_seconds, self.rpo_objective_seconds);
        self.exit_code = match self.failures.first() {
            Some(f) => f.kind.exit_code(),
            None if !self.objectives_met => Kind::Threshold.exit_code(),
            None => 0,
        };
        self.passed = self.exit_code == 0;
    }

    /// What the repository keeps of this drill.
    pub fn record(&self) -> DrillRecord {
        let failed = self.failures.first();
        DrillRecord {
            format: RESULT_FORMAT,
            started_at: self.started_at.clone(),
            finished_at: self.finished_at.clone(),
            passed: self.passed,
            backup: self.backup.as_ref().map(|b| b.label.clone()),
            target: self.target.clone(),
            failed_step: failed
                .map(|f| f.step.clone())
                .or_else(|| (!self.objectives_met).then(|| "objectives".to_string())),
            failure: failed.map(|f| f.message.clone()).or_else(|| {
                (!self.objectives_met).then(|| self.objectives_text().unwrap_or_default())
            }),
            rto_seconds: self.rto_seconds,
            rpo_seconds: self.rpo_seconds,
            rto_objective_seconds: self.rto_objective_seconds,
            rpo_objective_seconds: self.rpo_objective_seconds,
            phases: self
                .phases
                .iter()
                .map(|p| PhaseRecord {
                    name: p.name.clone(),
                    seconds: p.seconds,
                    bytes: p.bytes,
                })
                .collect(),
            host: self.host.clone(),
        }
    }

    /// "RTO 4m12s over its objective 30s" for each objective missed.
    pub fn objectives_text(&self) -> Option<String> {
        let mut missed = Vec::new();
        for (what, got, want) in [
            ("RTO", self.rto_seconds, self.rto_objective_seconds),
            ("RPO", self.rpo_seconds, self.rpo_objective_seconds),
        ] {
            if let (Some(g), Some(w)) = (got, want) {
                if g > w {
                    missed.push(format!(
                        "{what} {} is over its objective {}",
                        duration_text(g),
                        duration_text(w)
                    ));
                }
            } else if let (None, Some(w)) = (got, want) {
                missed.push(format!(
                    "{what} was not measured (objective {})",
                    duration_text(w)
                ));
            }
        }
        (!missed.is_empty()).then(|| missed.join("; "))
    }
}

fn met(got: Option<f64>, objective: Option<f64>) -> bool {
    match (got, objective) {
        (_, None) => true,
        (Some(g), Some(o)) => g <= o,
        (None, Some(_)) => false,
    }
}

/// `4m12s`, `1h02m`, `3.2s`, `2d04h`.
pub fn duration_text(secs: f64) -> String {
    if secs < 1.0 {
        return format!("{:.0}ms", secs * 1000.0);
    }
    if secs < 60.0 {
        return format!("{secs:.1}s");
    }
    let s = secs.round() as u64;
    match s {
        0..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_people_write_them() {
        assert_eq!(duration_text(3.24), "3.2s");
        assert_eq!(duration_text(0.001), "1ms");
        assert_eq!(duration_text(0.8), "800ms");
        assert_eq!(duration_text(252.0), "4m12s");
        assert_eq!(duration_text(3720.0), "1h02m");
        assert_eq!(duration_text(190800.0), "2d05h");
    }

    #[test]
    fn objectives_decide_the_exit_code() {
        let mut r = DrillReport {
            schema_version: DRILL_SCHEMA_VERSION,
            stanza: "main".into(),
            repository: "/r".into(),
            host: "h".into(),
            started_at: String::new(),
            finished_at: String::new(),
            passed: false,
            exit_code: -1,
            backup: None,
            target: None,
            newest_archived_commit: None,
            recovered_to: None,
            rto_seconds: Some(5.0),
            rpo_seconds: Some(0.0),
            rto_objective_seconds: None,
            rpo_objective_seconds: Some(60.0),
            objectives_met: false,
            space: None,
            phases: vec![],
            replay_bytes: None,
            server: None,
            checks: vec![],
            failures: vec![],
            scratch_dir: None,
            kept: false,
        };
        r.decide();
        assert_eq!((r.exit_code, r.passed), (0, true));
        r.rto_objective_seconds = Some(1.0);
        r.decide();
        assert_eq!((r.exit_code, r.passed), (13, false));
        assert_eq!(
            r.objectives_text().unwrap(),
            "RTO 5.0s is over its objective 1.0s"
        );
        assert_eq!(r.record().failed_step.as_deref(), Some("objectives"));
        r.failures.push(Failure {
            step: "amcheck".into(),
            message: "x".into(),
            hint: None,
            kind: Kind::DrillFailed,
        });
        r.decide();
        assert_eq!(r.exit_code, 14);
        assert_eq!(r.record().failed_step.as_deref(), Some("amcheck"));
    }
}
