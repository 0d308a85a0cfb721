//! Holds no code: the system tests are in `tests/`, and drive the service
//! binaries (built by `cargo build --workspace --bins`) as child processes.
