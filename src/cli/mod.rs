//! Command line: clap definitions, rendering, exit codes.
pub fn main() -> i32 {
    0
}
