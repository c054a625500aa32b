//! pgvault: backup, WAL archive and point-in-time recovery for PostgreSQL.
//!
//! Layering (see docs/architecture.md): `cli` renders, `ops` holds one async
//! function per command, and below it `repo` (objects, codec, layout,
//! storage backends), `pg` (PostgreSQL file formats and SQL) and `catalog`
//! (the SQLite cache). Nothing below `cli` prints or knows clap.

pub mod catalog;
pub mod cli;
pub mod config;
pub mod error;
pub mod ops;
pub mod pg;
pub mod repo;
pub mod spool;
