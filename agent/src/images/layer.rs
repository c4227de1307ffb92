//! One layer blob: verify its digest and its diff_id (the digest of the
//! uncompressed tar) in a single pass, and unpack it into a directory that
//! overlayfs can use as a lower layer.
//!
//! Whiteouts become what overlayfs expects: `.wh.NAME` is a 0/0 character
//! device `NAME`, `.wh..wh..opq` is the `trusted.overlay.opaque=y` xattr on
//! its directory. Nothing is ever written outside the layer directory: `..`
//! entries are refused, absolute paths are taken relative to the layer, and
//! no path is followed through a symlink (parents are checked with lstat;
//! files are opened with `O_NOFOLLOW`; the staging directory is private to
//! the store, so nothing else changes it while we work).

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt, fchown, lchown};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use flate2::read::MultiGzDecoder;
use nix::sys::stat::{Mode, SFlag, makedev, mknod};

use super::ImageError;
use super::digest::{HashState, HashingReader};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];

/// What a pass over a layer blob found.
#[derive(Debug)]
pub struct LayerStats {
    /// sha256 hex of the blob as stored (compressed or not).
    pub blob: String,
    pub blob_size: u64,
    /// sha256 hex of the uncompressed tar.
    pub diff_id: String,
    /// Bytes of the uncompressed tar.
    pub size: u64,
    pub compressed: bool,
}

/// Where a pass over a blob writes, besides hashing it.
#[derive(Default)]
pub struct Outputs<'a> {
    /// Unpack the layer into this (new) directory.
    pub unpack_to: Option<&'a Path>,
    /// Copy the blob's bytes to this (new) file.
    pub copy_to: Option<&'a Path>,
    /// The blob's sha256 hex per the manifest: a blob that cannot be read
    /// as a layer is reported as a digest mismatch when it is not this.
    pub expected_blob: Option<&'a str>,
}

/// Reads the blob at `path` (named `file` in errors) once: hashes it,
/// decompresses it if it is gzip, hashes the tar, and writes `outputs`.
/// The caller compares the digests with what the manifest and config say.
pub fn process(path: &Path, file: &str, outputs: Outputs<'_>) -> Result<LayerStats, ImageError> {
    let source = File::open(path).map_err(ImageError::io(path))?;
    let copy = match outputs.copy_to {
        Some(dest) => Some(BufWriter::new(
            File::create_new(dest).map_err(ImageError::io(dest))?,
        )),
        None => None,
    };
    let mut blob_hash = HashState::default();
    let mut diff_hash = HashState::default();
    let compressed;
    {
        let tee = Tee {
            inner: source,
            copy,
        };
        let mut raw = BufReader::with_capacity(256 * 1024, HashingReader::new(tee, &mut blob_hash));
        let head = raw.fill_buf().map_err(ImageError::io(path))?;
        if head.starts_with(ZSTD_MAGIC) {
            return Err(ImageError::Unsupported {
                file: file.to_owned(),
                reason: "zstd-compressed layers are not supported".to_owned(),
            });
        }
        compressed = head.starts_with(GZIP_MAGIC);
        let mut decoder = if compressed {
            Decoder::Gzip(Box::new(MultiGzDecoder::new(raw)))
        } else {
            Decoder::Plain(raw)
        };
        let unpacked = (|| {
            let mut tar_stream = HashingReader::new(&mut decoder, &mut diff_hash);
            let bad_tar = |e: io::Error| ImageError::Invalid {
                file: file.to_owned(),
                reason: format!("not a valid layer: {e}"),
            };
            let mut archive = tar::Archive::new(&mut tar_stream);
            match outputs.unpack_to {
                Some(dest) => Unpacker::new(dest, file)?.unpack(&mut archive)?,
                None => {
                    for entry in archive.entries().map_err(bad_tar)? {
                        entry.map_err(bad_tar)?;
                    }
                }
            }
            // The tar may end before its stream does (padding after the
            // end-of-archive blocks): the digest covers every byte.
            io::copy(&mut tar_stream, &mut io::sink()).map_err(bad_tar)?;
            Ok(())
        })();
        let mut raw = decoder.into_inner();
        let drained = io::copy(&mut raw, &mut io::sink()).map_err(ImageError::io(path));
        if let Err(error) = unpacked {
            // A corrupted blob fails to decompress or parse; when it is not
            // the blob the manifest names, that is the error to report.
            if drained.is_ok()
                && let Some(expected) = outputs.expected_blob
            {
                let actual = std::mem::take(&mut blob_hash).hex();
                if actual != expected {
                    return Err(ImageError::DigestMismatch {
                        file: file.to_owned(),
                        expected: format!("sha256:{expected}"),
                        actual: format!("sha256:{actual}"),
                    });
                }
            }
            return Err(error);
        }
        drained?;
        let tee = raw.into_inner().into_inner();
        if let Some(mut copy) = tee.copy {
            copy.flush().map_err(ImageError::io(path))?;
        }
    }
    Ok(LayerStats {
        blob_size: blob_hash.bytes,
        blob: blob_hash.hex(),
        size: diff_hash.bytes,
        diff_id: diff_hash.hex(),
        compressed,
    })
}

enum Decoder<R: BufRead> {
    // Boxed: the inflate state is large, the plain variant is a reader.
    Gzip(Box<MultiGzDecoder<R>>),
    Plain(R),
}

impl<R: BufRead> Decoder<R> {
    fn into_inner(self) -> R {
        match self {
            Decoder::Gzip(d) => d.into_inner(),
            Decoder::Plain(r) => r,
        }
    }
}

impl<R: BufRead> Read for Decoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoder::Gzip(d) => d.read(buf),
            Decoder::Plain(r) => r.read(buf),
        }
    }
}

/// Copies what is read from `inner` to `copy`.
struct Tee {
    inner: File,
    copy: Option<BufWriter<File>>,
}

impl Read for Tee {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(copy) = &mut self.copy {
            copy.write_all(&buf[..n])?;
        }
        Ok(n)
    }
}

/// Turns a tar entry's path into a relative path of normal components:
/// `./a/b`, `/a/b` and `a//b/` all give `a/b`; `..` anywhere is refused.
/// `None` for the layer root itself.
pub fn clean_path(raw: &[u8]) -> Result<Option<PathBuf>, String> {
    let mut out = PathBuf::new();
    for component in Path::new(OsStr::from_bytes(raw)).components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => return Err("path climbs out with '..'".to_owned()),
            Component::Prefix(_) => return Err("not a Unix path".to_owned()),
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// Writes a layer's entries under `root`.
struct Unpacker<'a> {
    root: PathBuf,
    file: &'a str,
    /// Directories known to be real directories (not symlinks) under root.
    dirs: HashSet<PathBuf>,
    /// Directory mtimes, set last (adding entries changes them).
    dir_times: Vec<(PathBuf, SystemTime)>,
}

impl<'a> Unpacker<'a> {
    fn new(root: &Path, file: &'a str) -> Result<Self, ImageError> {
        fs::create_dir(root).map_err(ImageError::io(root))?;
        fs::set_permissions(root, fs::Permissions::from_mode(0o755))
            .map_err(ImageError::io(root))?;
        Ok(Unpacker {
            root: root.to_owned(),
            file,
            dirs: HashSet::new(),
            dir_times: Vec::new(),
        })
    }

    fn unpack<R: Read>(mut self, archive: &mut tar::Archive<R>) -> Result<(), ImageError> {
        let file = self.file;
        let bad_tar = |e: io::Error| ImageError::Invalid {
            file: file.to_owned(),
            reason: format!("not a valid layer: {e}"),
        };
        for entry in archive.entries().map_err(bad_tar)? {
            let mut entry = entry.map_err(bad_tar)?;
            let raw = entry.path_bytes().into_owned();
            let fail = |reason: String| ImageError::UnsafeLayer {
                file: file.to_owned(),
                entry: String::from_utf8_lossy(&raw).into_owned(),
                reason,
            };
            self.entry(&mut entry, &raw).map_err(fail)?;
        }
        for (dir, mtime) in self.dir_times.iter().rev() {
            if let Ok(handle) = File::open(dir) {
                let _ = handle.set_modified(*mtime);
            }
        }
        Ok(())
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>, raw: &[u8]) -> Result<(), String> {
        let kind = entry.header().entry_type();
        use tar::EntryType as T;
        let is_file_system_entry = matches!(
            kind,
            T::Directory
                | T::Regular
                | T::Continuous
                | T::GNUSparse
                | T::Symlink
                | T::Link
                | T::Char
                | T::Block
                | T::Fifo
        );
        if !is_file_system_entry {
            // PAX global headers and the like: metadata, not files.
            return Ok(());
        }
        let Some(rel) = clean_path(raw)? else {
            // The layer root: only its metadata can change.
            if kind.is_dir() {
                let root = self.root.clone();
                self.metadata(entry, &root, true)?;
            }
            return Ok(());
        };
        let name = rel.file_name().ok_or("no file name")?.to_owned();
        let parent = self.dir(rel.parent().unwrap_or(Path::new("")))?;
        let name_bytes = name.as_bytes();

        if let Some(hidden) = name_bytes.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
            return self.whiteout(&parent, name_bytes, hidden);
        }

        let path = parent.join(&name);
        match kind {
            tar::EntryType::Directory => {
                match fs::symlink_metadata(&path) {
                    Ok(meta) if meta.is_dir() => {}
                    Ok(_) => {
                        self.remove(&path)?;
                        fs::create_dir(&path).map_err(|e| e.to_string())?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        fs::create_dir(&path).map_err(|e| e.to_string())?;
                    }
                    Err(e) => return Err(e.to_string()),
                }
                self.dirs.insert(path.clone());
                self.metadata(entry, &path, true)?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                self.remove(&path)?;
                let mut out = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(nix::libc::O_NOFOLLOW)
                    .open(&path)
                    .map_err(|e| e.to_string())?;
                io::copy(entry, &mut out).map_err(|e| e.to_string())?;
                let header = entry.header();
                let (uid, gid) = owner(header)?;
                fchown(&out, Some(uid), Some(gid)).map_err(|e| e.to_string())?;
                // After chown, which clears setuid/setgid bits.
                out.set_permissions(fs::Permissions::from_mode(mode(header)?))
                    .map_err(|e| e.to_string())?;
                if let Some(mtime) = modified(header) {
                    let _ = out.set_modified(mtime);
                }
                self.xattrs(entry, &path);
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or("symlink without a target")?
                    .into_owned();
                self.remove(&path)?;
                // The target is only ever resolved inside the container's
                // root; the store never follows it.
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &path)
                    .map_err(|e| e.to_string())?;
                let (uid, gid) = owner(entry.header())?;
                lchown(&path, Some(uid), Some(gid)).map_err(|e| e.to_string())?;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or("hard link without a target")?;
                let target_rel = clean_path(&target)?.ok_or("hard link to the layer root")?;
                let target_parent = self.dir(target_rel.parent().unwrap_or(Path::new("")))?;
                let target = target_parent.join(target_rel.file_name().ok_or("no file name")?);
                match fs::symlink_metadata(&target) {
                    Ok(meta) if meta.is_dir() => return Err("hard link to a directory".to_owned()),
                    Ok(_) => {}
                    Err(_) => return Err("hard link to a file not in this layer".to_owned()),
                }
                if target == path {
                    return Ok(());
                }
                self.remove(&path)?;
                fs::hard_link(&target, &path).map_err(|e| e.to_string())?;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                self.remove(&path)?;
                self.device(entry, &path)?;
            }
            // Filtered out above.
            _ => {}
        }
        Ok(())
    }

    /// `.wh..wh..opq` marks `parent` opaque; `.wh.NAME` hides `NAME` from
    /// the layers below.
    fn whiteout(&mut self, parent: &Path, name: &[u8], hidden: &[u8]) -> Result<(), String> {
        if name == OPAQUE_MARKER.as_bytes() {
            return xattr::set(parent, OPAQUE_XATTR, b"y")
                .map_err(|e| format!("marking {} opaque: {e}", parent.display()));
        }
        if hidden.starts_with(WHITEOUT_PREFIX.as_bytes()) {
            // Other `.wh..wh.` names are aufs bookkeeping, meaningless here.
            return Ok(());
        }
        if hidden.is_empty() || hidden == b"." || hidden == b".." {
            return Err("bad whiteout name".to_owned());
        }
        let path = parent.join(OsStr::from_bytes(hidden));
        self.remove(&path)?;
        mknod(&path, SFlag::S_IFCHR, Mode::empty(), makedev(0, 0))
            .map_err(|e| format!("creating the whiteout device: {e}"))?;
        lchown(&path, Some(0), Some(0)).map_err(|e| e.to_string())
    }

    fn device<R: Read>(&self, entry: &tar::Entry<'_, R>, path: &Path) -> Result<(), String> {
        let header = entry.header();
        let kind = match header.entry_type() {
            tar::EntryType::Char => SFlag::S_IFCHR,
            tar::EntryType::Block => SFlag::S_IFBLK,
            _ => SFlag::S_IFIFO,
        };
        let major = header.device_major().ok().flatten().unwrap_or(0);
        let minor = header.device_minor().ok().flatten().unwrap_or(0);
        let perm = Mode::from_bits_truncate(mode(header)?);
        match mknod(path, kind, perm, makedev(major.into(), minor.into())) {
            Ok(()) => {}
            // Without CAP_MKNOD (a user namespace) device nodes are skipped;
            // the runtime provides /dev anyway.
            Err(nix::errno::Errno::EPERM) => {
                tracing::debug!(path = %path.display(), "skipping a device node: not permitted");
                return Ok(());
            }
            Err(e) => return Err(format!("creating the device node: {e}")),
        }
        let (uid, gid) = owner(header)?;
        lchown(path, Some(uid), Some(gid)).map_err(|e| e.to_string())?;
        fs::set_permissions(path, fs::Permissions::from_mode(mode(header)?))
            .map_err(|e| e.to_string())
    }

    /// Owner and mode of a directory.
    fn metadata<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        path: &Path,
        is_dir: bool,
    ) -> Result<(), String> {
        let header = entry.header();
        let (uid, gid) = owner(header)?;
        lchown(path, Some(uid), Some(gid)).map_err(|e| e.to_string())?;
        fs::set_permissions(path, fs::Permissions::from_mode(mode(header)?))
            .map_err(|e| e.to_string())?;
        if is_dir && let Some(mtime) = modified(header) {
            self.dir_times.push((path.to_owned(), mtime));
        }
        self.xattrs(entry, path);
        Ok(())
    }

    /// File capabilities and user xattrs from PAX headers. `trusted.*` is
    /// never taken from a layer: overlayfs keeps its own state there.
    fn xattrs<R: Read>(&self, entry: &mut tar::Entry<'_, R>, path: &Path) {
        let Ok(Some(extensions)) = entry.pax_extensions() else {
            return;
        };
        for extension in extensions.flatten() {
            let Ok(key) = extension.key() else { continue };
            let Some(name) = key.strip_prefix("SCHILY.xattr.") else {
                continue;
            };
            if !(name.starts_with("user.") || name == "security.capability") {
                continue;
            }
            if let Err(e) = xattr::set(path, name, extension.value_bytes()) {
                tracing::debug!(path = %path.display(), name, error = %e, "xattr not set");
            }
        }
    }

    /// The directory `rel` under root, created (0755) where missing; an
    /// error if any part of it is not a real directory.
    fn dir(&mut self, rel: &Path) -> Result<PathBuf, String> {
        let mut current = self.root.clone();
        for part in rel.components() {
            current.push(part);
            if self.dirs.contains(&current) {
                continue;
            }
            match fs::symlink_metadata(&current) {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => {
                    return Err(format!(
                        "{} is not a directory in this layer (a symlink or a file)",
                        current
                            .strip_prefix(&self.root)
                            .unwrap_or(&current)
                            .display()
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir(&current).map_err(|e| e.to_string())?;
                    fs::set_permissions(&current, fs::Permissions::from_mode(0o755))
                        .map_err(|e| e.to_string())?;
                }
                Err(e) => return Err(e.to_string()),
            }
            self.dirs.insert(current.clone());
        }
        Ok(current)
    }

    /// Removes whatever is at `path` (a later entry replaces an earlier one).
    fn remove(&mut self, path: &Path) -> Result<(), String> {
        match fs::symlink_metadata(path) {
            Ok(meta) if meta.is_dir() => {
                fs::remove_dir_all(path).map_err(|e| e.to_string())?;
                self.dirs.retain(|dir| !dir.starts_with(path));
                Ok(())
            }
            Ok(_) => fs::remove_file(path).map_err(|e| e.to_string()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// An entry's modification time; none when it is unreadable or beyond what
/// `SystemTime` holds (tar's base-256 numbers reach `u64::MAX` seconds).
fn modified(header: &tar::Header) -> Option<SystemTime> {
    let seconds = header.mtime().ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(seconds))
}

fn owner(header: &tar::Header) -> Result<(u32, u32), String> {
    let uid = header.uid().map_err(|e| format!("bad uid: {e}"))?;
    let gid = header.gid().map_err(|e| format!("bad gid: {e}"))?;
    let uid = u32::try_from(uid).map_err(|_| format!("uid {uid} out of range"))?;
    let gid = u32::try_from(gid).map_err(|_| format!("gid {gid} out of range"))?;
    Ok((uid, gid))
}

fn mode(header: &tar::Header) -> Result<u32, String> {
    Ok(header.mode().map_err(|e| format!("bad mode: {e}"))? & 0o7777)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_modification_time_beyond_system_time_is_dropped() {
        let mut header = tar::Header::new_gnu();
        header.set_mtime(1_700_000_000);
        assert_eq!(
            modified(&header),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
        header.set_mtime(u64::MAX);
        assert_eq!(header.mtime().ok(), Some(u64::MAX));
        assert_eq!(modified(&header), None);
    }
}
