//! Progress reporting as a trait: the library reports, `cli` renders (a
//! terminal bar, plain log lines, or nothing).

pub trait Progress: Send + Sync {
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
