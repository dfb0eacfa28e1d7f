//! Build script: the version line `--version` prints, package version and git
//! commit (issue 13, item 2); the logic is shared by the four binaries.

include!("../../packaging/build-version.rs");
