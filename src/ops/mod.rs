//! One async function per command. Options in, results out; `cli` renders
//! them. Nothing here prints.

pub mod archive_get;
pub mod archive_push;
pub mod backup;
pub mod check;
pub mod expire;
pub mod info;
pub mod progress;
pub mod restore;
pub mod stanza_create;
pub mod stanza_upgrade;
pub mod verify;
pub mod walfacts;
mod workers;
