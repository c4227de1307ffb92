//! `skiff images import|ls|rm`: the node's image store from the command
//! line, working on the same store the agent uses (safe while it runs).

use agent::images::{ImageStore, ImageSummary, store_dir};
use anyhow::{Context, bail};

use crate::cli::{ImagesArgs, ImagesCommand};

pub fn run(args: ImagesArgs) -> anyhow::Result<()> {
    let root = store_dir(&args.data_dir);
    let store = ImageStore::open(&root)
        .with_context(|| format!("opening the image store at {}", root.display()))?;
    match args.command {
        ImagesCommand::Import { files } => {
            let failed = each(&files, |file| {
                let images = store.import_archive(file)?;
                for image in images {
                    println!("imported {} ({})", names(&image), short_id(&image.id));
                }
                Ok(())
            });
            if failed > 0 {
                bail!("{failed} of {} archives not imported", files.len());
            }
        }
        ImagesCommand::Ls => print!("{}", table(&store.list())),
        ImagesCommand::Rm { references } => {
            let failed = each(&references, |reference| {
                store.remove(reference)?;
                println!("removed {reference}");
                Ok(())
            });
            if failed > 0 {
                bail!("{failed} of {} images not removed", references.len());
            }
        }
    }
    Ok(())
}

/// Runs `f` on every item, reporting each failure; returns how many failed.
fn each<T: std::fmt::Debug>(
    items: &[T],
    mut f: impl FnMut(&T) -> Result<(), agent::images::ImageError>,
) -> usize {
    let mut failed = 0;
    for item in items {
        if let Err(error) = f(item) {
            eprintln!("error: {error}");
            failed += 1;
        }
    }
    failed
}

/// IMAGE, ID, SIZE; one row per reference, `<none>` for unnamed images.
fn table(images: &[ImageSummary]) -> String {
    let mut rows = vec![["IMAGE".to_owned(), "ID".to_owned(), "SIZE".to_owned()]];
    for image in images {
        let none = ["<none>".to_owned()];
        let references = if image.references.is_empty() {
            &none[..]
        } else {
            &image.references[..]
        };
        for reference in references {
            rows.push([
                reference.clone(),
                short_id(&image.id).to_owned(),
                human_size(image.size),
            ]);
        }
    }
    let widths: Vec<usize> = (0..3)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line = format!(
            "{:<w0$}   {:<w1$}   {}",
            row[0],
            row[1],
            row[2],
            w0 = widths[0],
            w1 = widths[1]
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn names(image: &ImageSummary) -> String {
    if image.references.is_empty() {
        "<none>".to_owned()
    } else {
        image.references.join(", ")
    }
}

/// The first 12 hex digits, as docker and crictl print ids.
fn short_id(id: &str) -> &str {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    hex.get(..12).unwrap_or(hex)
}

/// Decimal units, as docker prints image sizes.
fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}B")
    } else {
        format!("{value:.3}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_owned()
            + UNITS[unit]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_docker() {
        assert_eq!(human_size(512), "512B");
        assert_eq!(human_size(4_261_000), "4.261MB");
        assert_eq!(human_size(2_000_000), "2MB");
        assert_eq!(human_size(1_500_000_000), "1.5GB");
    }

    #[test]
    fn table_has_a_row_per_reference() {
        let images = vec![
            ImageSummary {
                id: format!("sha256:{}", "ab".repeat(32)),
                references: vec![
                    "docker.io/library/a:1".into(),
                    "docker.io/library/a:2".into(),
                ],
                size: 1_000_000,
            },
            ImageSummary {
                id: format!("sha256:{}", "cd".repeat(32)),
                references: vec![],
                size: 10,
            },
        ];
        let text = table(&images);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[0].starts_with("IMAGE"));
        assert!(lines[1].contains("docker.io/library/a:1") && lines[1].contains("abababababab"));
        assert!(lines[3].starts_with("<none>") && lines[3].ends_with("10B"));
    }
}
