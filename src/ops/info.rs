//! `info`: what the repository holds for a stanza. Read from the
//! repository itself (the source of truth); the catalog is refreshed from
//! what was read.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::catalog::{Catalog, WalRow};
use crate::error::Result;
use crate::pg::{SegmentNo, TimelineId, WalFileKind, WalFileName};
use crate::repo::layout::{self, ArchiveKey};
use crate::repo::{DbInfo, Repository};

/// Bumped when a field changes meaning or disappears (adding fields does not).
pub const INFO_SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize)]
pub struct InfoReport {
    pub schema_version: u32,
    pub repository: String,
    pub stanza: StanzaReport,
    pub timelines: Vec<TimelineReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StanzaReport {
    pub name: String,
    pub system_identifier: String,
    pub pg_version: u32,
    pub wal_segment_size: u32,
    pub db_id: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct TimelineReport {
    pub timeline: u32,
    pub first_segment: Option<String>,
    pub last_segment: Option<String>,
    pub segments: u64,
    /// Runs of missing segments between the first and the last.
    pub gaps: Vec<Gap>,
    pub partial: Vec<String>,
    pub history_file: bool,
    /// Names under which more than one content is stored (a conflict).
    pub conflicts: Vec<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Gap {
    pub from: String,
    pub to: String,
}

#[derive(Default)]
struct NameState {
    claimed: bool,
    shas: BTreeSet<String>,
    size: u64,
}

pub async fn info(repo: &Repository, catalog: Option<&Catalog>) -> Result<InfoReport> {
    let stanza = repo.require_stanza().await?;
    let db = stanza.current().clone();
    let listing = repo
        .backend()
        .list(&layout::archive_root(repo.stanza(), &db.dir()))
        .await?;

    let mut names: BTreeMap<WalFileName, NameState> = BTreeMap::new();
    for m in &listing {
        match layout::parse_archive_key(&m.key) {
            Some(ArchiveKey::Claim { name }) => names.entry(name).or_default().claimed = true,
            Some(ArchiveKey::Data { name, sha }) => {
                let st = names.entry(name).or_default();
                st.shas.insert(sha.to_hex());
                st.size = m.size;
            }
            None => {}
        }
    }

    if let Some(cat) = catalog {
        let rows: Vec<WalRow> = names
            .iter()
            .filter(|(_, st)| st.shas.len() == 1)
            .map(|(n, st)| WalRow {
                name: n.as_str().to_string(),
                timeline: n.timeline().0,
                sha256: st.shas.iter().next().cloned().unwrap_or_default(),
                stored_size: st.size,
            })
            .collect();
        cat.replace_wal_best_effort(repo.stanza(), rows).await;
    }

    Ok(InfoReport {
        schema_version: INFO_SCHEMA_VERSION,
        repository: repo.describe(),
        stanza: StanzaReport {
            name: repo.stanza().to_string(),
            system_identifier: db.system_identifier.clone(),
            pg_version: db.pg_version,
            wal_segment_size: db.wal_segment_size,
            db_id: db.id,
        },
        timelines: timelines(&db, &names),
    })
}

fn timelines(db: &DbInfo, names: &BTreeMap<WalFileName, NameState>) -> Vec<TimelineReport> {
    let seg_size = db.wal_segment_size;
    let mut per_tli: BTreeMap<TimelineId, TimelineReport> = BTreeMap::new();
    let mut segnos: BTreeMap<TimelineId, Vec<SegmentNo>> = BTreeMap::new();
    for (name, st) in names {
        let tli = name.timeline();
        let rep = per_tli.entry(tli).or_insert_with(|| TimelineReport {
            timeline: tli.0,
            first_segment: None,
            last_segment: None,
            segments: 0,
            gaps: Vec::new(),
            partial: Vec::new(),
            history_file: false,
            conflicts: Vec::new(),
        });
        if st.shas.len() > 1 || (!st.claimed && st.shas.is_empty()) {
            rep.conflicts.push(name.as_str().to_string());
        }
        match name.kind() {
            WalFileKind::Segment => {
                if let Some(s) = name.segno(seg_size) {
                    segnos.entry(tli).or_default().push(s);
                }
            }
            WalFileKind::Partial => rep.partial.push(name.as_str().to_string()),
            WalFileKind::History => rep.history_file = true,
            WalFileKind::BackupLabel => {}
        }
    }
    for (tli, mut segs) in segnos {
        segs.sort();
        segs.dedup();
        let rep = per_tli.get_mut(&tli).expect("timeline seen above");
        let seg_name = |s: SegmentNo| {
            WalFileName::for_segment(tli, s, seg_size)
                .as_str()
                .to_string()
        };
        rep.segments = segs.len() as u64;
        rep.first_segment = segs.first().map(|&s| seg_name(s));
        rep.last_segment = segs.last().map(|&s| seg_name(s));
        for w in segs.windows(2) {
            let (a, b) = (w[0].0, w[1].0);
            if b > a + 1 {
                rep.gaps.push(Gap {
                    from: seg_name(SegmentNo(a + 1)),
                    to: seg_name(SegmentNo(b - 1)),
                });
            }
        }
    }
    per_tli.into_values().collect()
}
