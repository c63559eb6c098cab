//! Which git commit a build of edgelb is made from, for `lb-userspace/build.rs` to put in the
//! binary ([`describe`]). Shared with the library only for its unit tests (a build script's
//! own tests never run), so it names nothing of the crate.

use std::path::{Path, PathBuf};

/// What a build says when it cannot tell its commit: git is not installed, or the source is not
/// a git checkout (a release tarball), or one without a commit yet.
pub const UNKNOWN: &str = "unknown";

/// The commit a source tree is, as [`describe`] found it.
#[derive(Debug, PartialEq, Eq)]
pub struct Described {
    /// The short hash of HEAD, `-dirty` after it when a tracked file differs from it; [`UNKNOWN`]
    /// when git cannot say.
    pub commit: String,
    /// The files (and at most one directory) whose change means HEAD may have moved, for the
    /// build script to be run again then (`rerun-if-changed`): HEAD and its reflog, the branch's
    /// ref (or, while the ref is packed, the nearest existing directory its loose file would be
    /// written below), `packed-refs` and a reftable's `tables.list`.
    /// Only paths that exist: cargo runs a build script again at every build for a path that
    /// does not.
    pub watch: Vec<PathBuf>,
}

/// Describes the source tree at `root` (the workspace's root), asking `git` for it: `git` runs
/// git with these arguments in `root` and gives its standard output, trimmed at the end, or none
/// when git cannot be run or fails. `given` (the build's `EDGELB_GIT_COMMIT`, for a packager
/// building a tarball of a known commit) is taken as is when not empty, and nothing is watched.
///
/// A tree that is not `root`'s own checkout (a tarball unpacked inside another repository) is
/// [`UNKNOWN`]: that repository's commit says nothing of it. Whether it is dirty is asked
/// without taking the index's lock (`--no-optional-locks`): a build running beside the
/// developer's own `git commit` must not make it fail on `index.lock`. When that answer cannot
/// be had, the tree is said dirty rather than claimed clean.
pub fn describe(
    root: &Path,
    given: Option<&str>,
    git: &dyn Fn(&[&str]) -> Option<String>,
) -> Described {
    if let Some(given) = given.filter(|g| !g.is_empty()) {
        return Described { commit: given.to_owned(), watch: Vec::new() };
    }
    let unknown = || Described { commit: UNKNOWN.to_owned(), watch: Vec::new() };
    let Some(top) = git(&["rev-parse", "--show-toplevel"]) else { return unknown() };
    if !same_dir(Path::new(&top), root) {
        return unknown();
    }
    // Fails in a repository without a commit yet.
    let Some(hash) = git(&["rev-parse", "--short", "HEAD"]) else { return unknown() };
    let status = ["--no-optional-locks", "status", "--porcelain", "--untracked-files=no"];
    let dirty = git(&status).is_none_or(|changes| !changes.is_empty());
    let commit = if dirty { format!("{hash}-dirty") } else { hash };
    // Relative paths are git's answers from `root`.
    let mut watch = Vec::new();
    if let Some(dir) = git(&["rev-parse", "--git-dir"]).map(|d| root.join(d)) {
        watch.push(dir.join("HEAD"));
        // HEAD's reflog, which every move of HEAD (a commit, a checkout, a reset) appends to,
        // whichever way the ref itself is stored (packed, or a reftable, where neither HEAD
        // nor a loose ref file changes).
        watch.push(dir.join("logs").join("HEAD"));
    }
    // A worktree's HEAD is its own; the refs are the repository's (its common directory).
    if let Some(common) = git(&["rev-parse", "--git-common-dir"]).map(|c| root.join(c)) {
        // None with a detached HEAD, whose file holds the hash itself.
        if let Some(head_ref) = git(&["symbolic-ref", "-q", "HEAD"]) {
            let loose = common.join(head_ref);
            if loose.exists() {
                watch.push(loose);
            } else if let Some(parent) = loose.ancestors().skip(1).find(|p| p.exists()) {
                // Packed: the next commit writes it loose, below the nearest directory that
                // exists (a packed `feature/x` has no `refs/heads/feature` any more).
                watch.push(parent.to_owned());
            }
        }
        watch.push(common.join("packed-refs"));
        watch.push(common.join("reftable").join("tables.list"));
    }
    watch.retain(|p| p.exists());
    Described { commit, watch }
}

/// Are `a` and `b` the same directory (either written with symbolic links or `..`)?
fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}
