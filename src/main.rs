fn main() {
    std::process::exit(pgvault::cli::main());
}
