//! Which build of edgelb this is: the crate's version and the git commit it was built from, as
//! `lb-userspace/build.rs` found it. During a rolling upgrade or a takeover an operator must
//! tell which binary runs on each node, and whether a takeover really swapped it: `edgelb
//! --version` says this one's, `edgelb status` the running controller's (and whether it is
//! this one), `/metrics` has `edgelb_build_info`, and a takeover logs both builds.

#[cfg(test)]
mod git;

/// The crate's version (`Cargo.toml`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git commit this binary was built from: its short hash, `abc1234`, with `-dirty` after it
/// when tracked files differed from it; `unknown` when built where git could not tell (a
/// release tarball, or no git installed), unless the build was given one (`EDGELB_GIT_COMMIT`
/// in the build's environment).
pub const COMMIT: &str = env!("EDGELB_GIT_COMMIT");

/// `0.1.0 (abc1234)`: the version and commit, as `edgelb --version` prints them after the name.
pub const VERSION_AND_COMMIT: &str =
    concat!(env!("CARGO_PKG_VERSION"), " (", env!("EDGELB_GIT_COMMIT"), ")");

/// `edgelb 0.1.0 (abc1234)`: this build as `edgelb --version`, `edgelb status` and the logs say
/// it, one string that two builds share only when they are the same.
pub const VERSION_LINE: &str =
    concat!("edgelb ", env!("CARGO_PKG_VERSION"), " (", env!("EDGELB_GIT_COMMIT"), ")");

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, path::Path};

    use super::{
        VERSION_LINE,
        git::{Described, UNKNOWN, describe},
    };

    /// A git that answers each argument list from `answers` (joined with spaces), and fails for
    /// any other, as git does asked outside a repository.
    fn fake(answers: &[(&str, &str)]) -> impl Fn(&[&str]) -> Option<String> {
        let answers: HashMap<String, String> =
            answers.iter().map(|(a, b)| ((*a).to_owned(), (*b).to_owned())).collect();
        move |args: &[&str]| answers.get(&args.join(" ")).cloned()
    }

    const STATUS: &str = "--no-optional-locks status --porcelain --untracked-files=no";

    /// No git, a tree inside another repository's checkout (a tarball unpacked there), and a
    /// repository without a commit are all `unknown`, with nothing to watch; never a failure.
    #[test]
    fn a_tree_git_cannot_describe_is_unknown() {
        let root = Path::new("/nonexistent/edgelb");
        let unknown = Described { commit: UNKNOWN.to_owned(), watch: Vec::new() };
        assert_eq!(describe(root, None, &|_| None), unknown);
        let elsewhere = fake(&[("rev-parse --show-toplevel", "/nonexistent"), (STATUS, "")]);
        assert_eq!(describe(root, None, &elsewhere), unknown);
        let no_commit = fake(&[("rev-parse --show-toplevel", "/nonexistent/edgelb")]);
        assert_eq!(describe(root, None, &no_commit), unknown);
        // Given by the build's environment: taken as is, whatever git says; empty is not given.
        let given = describe(root, Some("0123abc"), &|_| panic!("git asked"));
        assert_eq!(given, Described { commit: "0123abc".to_owned(), watch: Vec::new() });
        assert_eq!(describe(root, Some(""), &|_| None), unknown);
    }

    /// A checkout is its short hash, `-dirty` after it when `git status` lists a change, or when
    /// it cannot be asked (not claimed clean unknown); the paths to watch that do not exist are
    /// left out.
    #[test]
    fn a_checkout_is_its_short_hash_dirty_or_not() {
        let root = Path::new("/nonexistent/edgelb");
        let base = [
            ("rev-parse --show-toplevel", "/nonexistent/edgelb"),
            ("rev-parse --short HEAD", "abc1234"),
            ("rev-parse --git-dir", ".git"),
        ];
        let commit = |extra: &[(&str, &str)]| {
            let answers: Vec<(&str, &str)> = base.iter().chain(extra).copied().collect();
            let d = describe(root, None, &fake(&answers));
            assert_eq!(d.watch, Vec::<std::path::PathBuf>::new(), "none of them exists");
            d.commit
        };
        assert_eq!(commit(&[(STATUS, "")]), "abc1234");
        assert_eq!(commit(&[(STATUS, " M lb-userspace/src/lib.rs")]), "abc1234-dirty");
        assert_eq!(commit(&[]), "abc1234-dirty");
    }

    /// With the real git, in a repository made for the test: the hash git gives, `-dirty` once a
    /// tracked file changes (an untracked one does not count), and the files to watch: HEAD,
    /// the branch's loose ref, or while it is packed the directory it will be written to; the
    /// describing leaves no `index.lock` behind (nor takes it).
    #[test]
    fn a_real_checkout_is_described_as_git_sees_it() {
        /// Removes the repository however the test ends.
        struct Removed(std::path::PathBuf);
        impl Drop for Removed {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let dir = std::env::temp_dir().join(format!("edgelb-build-git-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let removed = Removed(dir.clone());
        let git = |args: &[&str]| -> Option<String> {
            let out = std::process::Command::new("git")
                .arg("-C")
                .arg(&dir)
                .args(args)
                .env("GIT_CONFIG_GLOBAL", "/dev/null")
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .output()
                .expect("git runs (the build needs it to say its commit)");
            out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim_end().to_owned())
        };
        let must = |args: &[&str]| git(args).unwrap_or_else(|| panic!("git {args:?} failed"));
        must(&["init", "-q", "-b", "main"]);
        assert_eq!(describe(&dir, None, &git).commit, UNKNOWN, "no commit yet");
        std::fs::write(dir.join("a"), "1").unwrap();
        must(&["add", "a"]);
        must(&["-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-qm", "a"]);
        let hash = must(&["rev-parse", "--short", "HEAD"]);
        std::fs::write(dir.join("untracked"), "x").unwrap();
        let d = describe(&dir, None, &git);
        assert_eq!(d.commit, hash);
        let git_dir = dir.join(".git");
        let head = [git_dir.join("HEAD"), git_dir.join("logs/HEAD")];
        assert_eq!(d.watch, [&head[..], &[git_dir.join("refs/heads/main")]].concat());
        std::fs::write(dir.join("a"), "2").unwrap();
        assert_eq!(describe(&dir, None, &git).commit, format!("{hash}-dirty"));
        assert!(!git_dir.join("index.lock").exists());
        must(&["pack-refs", "--all"]);
        let d = describe(&dir, None, &git);
        let packed =
            [&head[..], &[git_dir.join("refs/heads"), git_dir.join("packed-refs")]].concat();
        assert_eq!(d.watch, packed);
        // A packed branch named with a slash: its loose file's directory is gone too, and the
        // nearest one that exists is watched.
        must(&["checkout", "-q", "-b", "feature/x"]);
        must(&["pack-refs", "--all"]);
        assert!(!git_dir.join("refs/heads/feature").exists());
        assert_eq!(describe(&dir, None, &git).watch, packed);
        drop(removed);
        assert!(!dir.exists());
    }

    /// The line every place says the build with: the name, the version, the commit in brackets.
    #[test]
    fn the_version_line_names_version_and_commit() {
        let want = format!("edgelb {} ({})", env!("CARGO_PKG_VERSION"), env!("EDGELB_GIT_COMMIT"));
        assert_eq!(VERSION_LINE, want);
        assert!(!super::COMMIT.is_empty());
    }
}
