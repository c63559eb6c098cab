//! Reading the config file: its bytes (only from a regular file of bounded size, so that a
//! FIFO or a device given as the config cannot hold up a reload), their identity
//! ([`content_hash`]), the text (a file that is not UTF-8 refused at the first byte that is
//! not), where a `cookie_secret` is written (for the caution about a file others may read),
//! and the line and column of a byte, which every message about the file points at.

use std::path::Path;

use super::message::quoted;

/// The identity of a config file's contents: the SHA-256 of its bytes, in lowercase hex. Equal
/// hashes are the same file, byte for byte; any edit, even one that changes nothing in force (a
/// comment), gives another.
pub fn content_hash(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The largest config file read, far above any real one: a larger file is refused rather than
/// read whole (a path to something endless would otherwise grow until memory runs out).
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// The bytes of config file `path`, which must be a regular file (a symbolic link to one is
/// fine) of at most [`MAX_CONFIG_BYTES`]. Anything else is refused before it is read: opening a
/// FIFO waits for a writer, which would hold up a reload, and with it the controller, without
/// end; a device may never end. The type is checked before opening (opening some devices does
/// something), and again on what was opened, which is opened non-blocking in case a FIFO took
/// the path's place in between.
pub(super) fn read_bytes(path: &Path) -> std::io::Result<(Vec<u8>, u32)> {
    use std::io::Read as _;
    use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
    let regular = |t: std::fs::FileType| -> std::io::Result<()> {
        let kind = if t.is_file() {
            return Ok(());
        } else if t.is_dir() {
            "a directory"
        } else if t.is_fifo() {
            "a FIFO"
        } else if t.is_socket() {
            "a socket"
        } else if t.is_char_device() {
            "a character device"
        } else if t.is_block_device() {
            "a block device"
        } else {
            "of another type"
        };
        Err(std::io::Error::other(format!("not a regular file but {kind}")))
    };
    regular(std::fs::metadata(path)?.file_type())?;
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)?;
    let meta = file.metadata()?;
    regular(meta.file_type())?;
    let mut text = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1).read_to_end(&mut text)?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(std::io::Error::other(format!(
            "larger than {} MiB, which no config is",
            MAX_CONFIG_BYTES >> 20
        )));
    }
    Ok((text, std::os::unix::fs::PermissionsExt::mode(&meta.permissions())))
}

/// `bytes`, a config file, as text; if they are not UTF-8 (a comment saved as Latin-1, say), the
/// line and column of the first byte that is not, and what to do, as every other error is told:
/// the file is refused, but where it goes wrong is said rather than left to be searched for.
pub(super) fn utf8(bytes: Vec<u8>) -> Result<String, (usize, usize, String)> {
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let bytes = e.as_bytes();
        let valid = std::str::from_utf8(&bytes[..at]).expect("valid up to here");
        let (line, column) = line_col(valid, at);
        (line, column, format!("byte 0x{:02X} is not UTF-8 (save the file as UTF-8)", bytes[at]))
    })
}

/// Where the first `cookie_secret` key of `text` (a file that parsed) is written, and the name
/// of its VIP: what a caution about the secret points at.
pub(super) fn first_secret(text: &str) -> Option<(usize, String)> {
    use toml::de::{DeTable, DeValue};
    fn get<'a, 'i>(t: &'a DeTable<'i>, key: &str) -> Option<&'a DeValue<'i>> {
        t.iter().find(|(k, _)| k.get_ref() == key).map(|(_, v)| v.get_ref())
    }
    let root = DeTable::parse(text).ok()?;
    let Some(DeValue::Array(vips)) = get(root.get_ref(), "vip") else { return None };
    vips.iter().find_map(|vip| {
        let DeValue::Table(vip) = vip.get_ref() else { return None };
        let Some(DeValue::Table(l7)) = get(vip, "l7") else { return None };
        let (key, _) = l7.iter().find(|(k, _)| k.get_ref() == "cookie_secret")?;
        let name = match get(vip, "name") {
            // Shown as the VIP-name caution shows it: a name may hold control characters.
            Some(DeValue::String(n)) => quoted(n),
            _ => String::new(),
        };
        Some((key.span().start, name))
    })
}

/// 1-based line and column of byte `offset` in `text`.
pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}
