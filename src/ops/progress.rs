//! Progress reporting as a trait: the library reports, `cli` renders (a
//! terminal bar, plain log lines, or nothing).

pub trait Progress: Send + Sync {
    /// A phase of the command begins (copying files, replaying WAL, …);
    /// the one before it, if any, has ended. The counts below are the
    /// current phase's.
    fn phase(&self, _name: &str) {}
    /// How much work there is.
    fn set_total(&self, _files: u64, _bytes: u64) {}
    /// One file done, of this many bytes.
    fn file_done(&self, _bytes: u64) {}
    /// A step worth telling a person about.
    fn message(&self, _msg: &str) {}
    fn finish(&self) {}
}

/// Reports nothing.
pub struct NoProgress;

impl Progress for NoProgress {}
