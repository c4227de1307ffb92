//! Image reference normalisation as docker, containerd and the kubelet do
//! it (distribution/reference's `ParseNormalizedNamed` + `TagNameOnly`):
//! `busybox` → `docker.io/library/busybox:latest`.

use super::ImageError;

const DEFAULT_DOMAIN: &str = "docker.io";
const OFFICIAL_PREFIX: &str = "library/";
const MAX_NAME_LEN: usize = 255;

/// The fully qualified form of an image reference: registry domain, path,
/// and `:latest` when neither a tag nor a digest is given. Digests are kept.
pub fn normalize_reference(r: &str) -> Result<String, ImageError> {
    let invalid = |reason: &str| ImageError::InvalidReference {
        reference: r.to_owned(),
        reason: reason.to_owned(),
    };
    if r.is_empty() {
        return Err(invalid("empty"));
    }
    let (name_tag, digest) = match r.split_once('@') {
        Some((name_tag, digest)) => {
            check_digest(digest).map_err(|reason| invalid(&reason))?;
            (name_tag, Some(digest))
        }
        None => (r, None),
    };
    // A ':' after the last '/' starts the tag; before it, it is a port.
    let (name, tag) = match name_tag.rfind(':') {
        Some(i) if !name_tag[i + 1..].contains('/') => (&name_tag[..i], Some(&name_tag[i + 1..])),
        _ => (name_tag, None),
    };
    if let Some(tag) = tag {
        check_tag(tag).map_err(|reason| invalid(&reason))?;
    }
    let (domain, path) = split_domain(name);
    if domain == DEFAULT_DOMAIN && !name.contains('/') && is_64_hex(path) {
        return Err(invalid(
            "a 64-character hex string is an image id, not a name",
        ));
    }
    check_domain(domain).map_err(|reason| invalid(&reason))?;
    check_path(path).map_err(|reason| invalid(&reason))?;
    let path = if domain == DEFAULT_DOMAIN && !path.contains('/') {
        format!("{OFFICIAL_PREFIX}{path}")
    } else {
        path.to_owned()
    };
    let mut out = format!("{domain}/{path}");
    if out.len() > MAX_NAME_LEN {
        return Err(invalid("name longer than 255 characters"));
    }
    match (tag, digest) {
        (Some(tag), _) => {
            out.push(':');
            out.push_str(tag);
        }
        (None, None) => out.push_str(":latest"),
        (None, Some(_)) => {}
    }
    if let Some(digest) = digest {
        out.push('@');
        out.push_str(digest);
    }
    Ok(out)
}

/// The registry part is the first component when it looks like a host
/// (has a '.' or a ':' port, or is `localhost`); Docker Hub otherwise.
fn split_domain(name: &str) -> (&str, &str) {
    match name.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            let domain = if first == "index.docker.io" {
                DEFAULT_DOMAIN
            } else {
                first
            };
            (domain, rest)
        }
        _ => (DEFAULT_DOMAIN, name),
    }
}

fn check_domain(domain: &str) -> Result<(), String> {
    let (host, port) = match domain.strip_prefix('[') {
        // An IPv6 literal: [::1]:5000.
        Some(rest) => {
            let (ip, after) = rest.split_once(']').ok_or("unclosed '[' in the registry")?;
            if ip.is_empty() || !ip.bytes().all(|b| b.is_ascii_hexdigit() || b == b':') {
                return Err(format!("bad IPv6 registry address {ip:?}"));
            }
            ("", after.strip_prefix(':'))
        }
        None => match domain.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (domain, None),
        },
    };
    if !domain.starts_with('[') {
        let ok = !host.is_empty()
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
        if !ok {
            return Err(format!("bad registry host {host:?}"));
        }
    }
    if let Some(port) = port
        && (port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(format!("bad registry port {port:?}"));
    }
    Ok(())
}

/// Path components: lowercase alphanumerics joined by `.`, `_`, `__` or
/// runs of `-`.
fn check_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("empty repository name".to_owned());
    }
    for component in path.split('/') {
        if component.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err("repository name must be lowercase".to_owned());
        }
        if !valid_component(component) {
            return Err(format!("bad repository name component {component:?}"));
        }
    }
    Ok(())
}

fn valid_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &component[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn check_tag(tag: &str) -> Result<(), String> {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = tag.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 128
        && word(bytes[0])
        && bytes.iter().all(|&b| word(b) || b == b'.' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!("bad tag {tag:?}"))
    }
}

fn check_digest(digest: &str) -> Result<(), String> {
    let bad = || format!("bad digest {digest:?}");
    let (algorithm, hex) = digest.split_once(':').ok_or_else(bad)?;
    let algorithm_ok = !algorithm.is_empty()
        && algorithm.split(['+', '.', '_', '-']).all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        });
    let hex_ok = hex.len() >= 32 && hex.bytes().all(|b| b.is_ascii_hexdigit());
    if !algorithm_ok || !hex_ok {
        return Err(bad());
    }
    if algorithm == "sha256" && !super::digest::is_sha256_hex(hex) {
        return Err(bad());
    }
    Ok(())
}

fn is_64_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "6c3c624b58dbbcd3c0dd82b4c53f04194d1247c6eebdaab7c610cf7d66709b3b";

    #[test]
    fn normalises_like_containerd() {
        let digest = format!("sha256:{HEX}");
        let cases = [
            ("busybox", "docker.io/library/busybox:latest".to_owned()),
            ("busybox:1.36", "docker.io/library/busybox:1.36".to_owned()),
            (
                "library/busybox",
                "docker.io/library/busybox:latest".to_owned(),
            ),
            (
                "docker.io/busybox",
                "docker.io/library/busybox:latest".to_owned(),
            ),
            (
                "index.docker.io/busybox",
                "docker.io/library/busybox:latest".to_owned(),
            ),
            ("foo/bar:1", "docker.io/foo/bar:1".to_owned()),
            ("foo/bar/baz", "docker.io/foo/bar/baz:latest".to_owned()),
            ("reg:5000/x", "reg:5000/x:latest".to_owned()),
            ("reg:5000/x:v2", "reg:5000/x:v2".to_owned()),
            ("localhost/x", "localhost/x:latest".to_owned()),
            ("localhost:5000/a/b:c", "localhost:5000/a/b:c".to_owned()),
            (
                "quay.io/coreos/etcd:v3.4",
                "quay.io/coreos/etcd:v3.4".to_owned(),
            ),
            ("[::1]:5000/x", "[::1]:5000/x:latest".to_owned()),
            (
                "my_app-2.x__y",
                "docker.io/library/my_app-2.x__y:latest".to_owned(),
            ),
            ("a--b", "docker.io/library/a--b:latest".to_owned()),
            (
                &*format!("busybox@{digest}"),
                format!("docker.io/library/busybox@{digest}"),
            ),
            (
                &*format!("busybox:1@{digest}"),
                format!("docker.io/library/busybox:1@{digest}"),
            ),
            (
                "docker.io/library/busybox:latest",
                "docker.io/library/busybox:latest".to_owned(),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(normalize_reference(input).unwrap(), want, "{input}");
        }
    }

    #[test]
    fn rejects_bad_references() {
        for bad in [
            "",
            "Busybox",
            "foo/Bar",
            "busybox:",
            "busybox:-x",
            "busybox@sha256:abc",
            "busybox@sha256",
            "foo//bar",
            "/foo",
            "foo/",
            "foo..bar",
            "foo.-bar",
            "-foo",
            "reg:/x",
            "reg:port/x",
            "a b",
            "busybox:tag:other",
            HEX,
            "[::1/x",
        ] {
            assert!(
                normalize_reference(bad).is_err(),
                "{bad:?} should be rejected"
            );
        }
        let too_long = format!("{}:1", "a".repeat(300));
        assert!(normalize_reference(&too_long).is_err());
        let long_tag = format!("busybox:{}", "a".repeat(129));
        assert!(normalize_reference(&long_tag).is_err());
    }
}
