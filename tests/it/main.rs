//! The integration tests: one binary, as ripgrep has, so `tests/it/common`
//! is compiled once and every helper in it is used by some module.
//!
//! Each module drives real things — PostgreSQL run as an unprivileged user,
//! the real `pgvault` binary, real S3-API servers — and is run through
//! `scripts/test.sh`, which installs and starts them (see common/mod.rs for
//! the `PGVAULT_TEST_*` variables). `cargo test --test it archive::` runs
//! one module.

mod common;

mod archive;
mod backends;
mod blockrefs;
mod campaign;
mod clouds;
mod config;
mod drill;
mod encryption;
mod incr;
mod lookahead;
mod manyfiles;
mod metrics;
mod multirepo;
mod operations;
mod orphans;
mod package;
mod pages;
mod patroni;
mod pitr;
mod prefetch;
mod resume;
mod runbooks;
mod standby;
mod storageopts;
mod targets;
mod timelines;
mod upgrade;
