//! The outer archive: a tar (optionally gzip-compressed) holding an OCI
//! image layout or a `docker save` tree, extracted into a private staging
//! directory so its members can be read in any order.
//!
//! Only regular files and directories are written. Links between members
//! (old `docker save` links identical layers) are resolved inside the
//! archive afterwards and become hard links to the staged file; anything
//! pointing outside is dropped.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Component, Path, PathBuf};

use flate2::read::MultiGzDecoder;

use super::ImageError;
use super::layer::clean_path;

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];

/// Extracts `archive` into the new directory `dest`.
pub fn extract(archive: &Path, dest: &Path) -> Result<(), ImageError> {
    let not_archive = |reason: String| ImageError::NotAnArchive {
        path: archive.to_owned(),
        reason,
    };
    let file = File::open(archive).map_err(ImageError::io(archive))?;
    let mut input = BufReader::with_capacity(256 * 1024, file);
    let head = input.fill_buf().map_err(ImageError::io(archive))?;
    if head.is_empty() {
        return Err(not_archive("the file is empty".to_owned()));
    }
    if head.starts_with(ZSTD_MAGIC) {
        return Err(ImageError::Unsupported {
            file: archive.display().to_string(),
            reason: "zstd-compressed archives are not supported; decompress it first (zstd -d)"
                .to_owned(),
        });
    }
    let reader: Box<dyn Read> = if head.starts_with(GZIP_MAGIC) {
        Box::new(MultiGzDecoder::new(input))
    } else {
        Box::new(input)
    };
    fs::create_dir(dest).map_err(ImageError::io(dest))?;

    let mut tar = tar::Archive::new(reader);
    let mut links = Vec::new();
    let mut created = HashSet::new();
    let mut count = 0usize;
    for entry in tar.entries().map_err(|e| not_archive(e.to_string()))? {
        let mut entry = entry.map_err(|e| not_archive(format!("not a tar archive: {e}")))?;
        count += 1;
        let raw = entry.path_bytes().into_owned();
        let Some(rel) = clean_path(&raw).map_err(|reason| ImageError::UnsafeLayer {
            file: archive.display().to_string(),
            entry: String::from_utf8_lossy(&raw).into_owned(),
            reason,
        })?
        else {
            continue;
        };
        let path = dest.join(&rel);
        match entry.header().entry_type() {
            tar::EntryType::Directory => {
                fs::create_dir_all(&path).map_err(ImageError::io(&path))?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if let Some(parent) = path.parent() {
                    fs::create_dir_all(parent).map_err(ImageError::io(parent))?;
                }
                if created.insert(rel.clone()) {
                    let mut out = File::create_new(&path).map_err(ImageError::io(&path))?;
                    io::copy(&mut entry, &mut out).map_err(|e| {
                        not_archive(format!("reading member {}: {e}", rel.display()))
                    })?;
                }
            }
            tar::EntryType::Symlink | tar::EntryType::Link => {
                let symbolic = entry.header().entry_type() == tar::EntryType::Symlink;
                if let Some(target) = entry.link_name_bytes() {
                    let target =
                        PathBuf::from(std::ffi::OsStr::new(&*String::from_utf8_lossy(&target)));
                    links.push((rel, target, symbolic));
                }
            }
            _ => {}
        }
    }
    if count == 0 {
        return Err(not_archive("no tar entries".to_owned()));
    }
    for (rel, target, symbolic) in links {
        let base = if symbolic {
            rel.parent().unwrap_or(Path::new("")).to_owned()
        } else {
            PathBuf::new()
        };
        let Some(resolved) = resolve_inside(&base, &target) else {
            tracing::debug!(member = %rel.display(), "ignoring a link that leaves the archive");
            continue;
        };
        let (from, to) = (dest.join(&resolved), dest.join(&rel));
        if fs::symlink_metadata(&from).is_ok_and(|m| m.is_file())
            && fs::symlink_metadata(&to).is_err()
        {
            if let Some(parent) = to.parent() {
                fs::create_dir_all(parent).map_err(ImageError::io(parent))?;
            }
            fs::hard_link(&from, &to).map_err(ImageError::io(&to))?;
        }
    }
    Ok(())
}

/// `target` (relative to `base`, or to the archive root when absolute) as
/// a path inside the archive, or `None` if it climbs out.
fn resolve_inside(base: &Path, target: &Path) -> Option<PathBuf> {
    let mut parts: Vec<&std::ffi::OsStr> = if target.is_absolute() {
        Vec::new()
    } else {
        base.iter().collect()
    };
    for component in target.components() {
        match component {
            Component::Normal(part) => parts.push(part),
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    (!parts.is_empty()).then(|| parts.iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_stay_inside() {
        let p = |s: &str| PathBuf::from(s);
        assert_eq!(
            resolve_inside(&p("b"), &p("../a/layer.tar")),
            Some(p("a/layer.tar"))
        );
        assert_eq!(
            resolve_inside(&p("b"), &p("/a/layer.tar")),
            Some(p("a/layer.tar"))
        );
        assert_eq!(resolve_inside(&p("b"), &p("../../etc/passwd")), None);
        assert_eq!(resolve_inside(&p(""), &p("..")), None);
    }
}
