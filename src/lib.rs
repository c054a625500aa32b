//! pgvault: backup, WAL archive and point-in-time recovery for PostgreSQL.
//!
//! Layering: `cli` parses, renders and maps errors to exit codes; `ops`
//! holds one async function per command; below it `repo` (keys, the object
//! format, the archive's rules, manifests, the stanza, the lock, storage
//! backends), `pg` (every fact about PostgreSQL's files, and its SQL) and
//! `catalog` (the SQLite cache). Nothing below `cli` prints or knows clap.
//! docs/architecture.md describes the layers, the data flow of each
//! command, where each rule lives and the order of writes and deletes.

pub mod catalog;
pub mod cli;
pub mod config;
pub mod error;
pub mod home;
pub mod ops;
pub mod pg;
pub mod repo;
pub mod spool;
