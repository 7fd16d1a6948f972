//! The `aiops` binary: parses the command line and hands over to [`aiops::cli`].

fn main() -> std::process::ExitCode {
    aiops::cli::main()
}
