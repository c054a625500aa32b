//! One async function per command. Options in, results out; `cli` renders
//! them. Nothing here prints.

pub mod archive_get;
pub mod archive_push;
pub mod info;
pub mod stanza_create;
