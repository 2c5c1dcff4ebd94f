//! What `zfs list` says about one volume's three slot datasets and their snapshots, read
//! with one command. Each `zfs` command costs a process and a walk of the pool's state, and
//! one operation asks about its slots a dozen times, so the driver keeps the listing until
//! it changes something itself.

use reimage_driver::command;
use reimage_driver::{Error, ErrorKind, Result};

use crate::classify;

/// One dataset or snapshot, as listed.
#[derive(Clone, Debug)]
pub struct Row {
    pub name: String,
    /// `filesystem`, `volume` or `snapshot`.
    pub kind: String,
    pub guid: String,
    /// The fields the listing was asked for after the guid, as printed (`-` where a field
    /// does not apply).
    pub used: String,
    pub referenced: String,
    pub limit: String,
    /// For a snapshot, its clones, comma-separated (`-` or empty if none).
    pub clones: String,
    /// For a clone, the snapshot it was cloned from (`-` if none).
    pub origin: String,
    /// The user property [`crate::IMAGE_PROPERTY`]: the image volume a clone holds the
    /// content of (`-` if unset).
    pub image: String,
}

#[derive(Clone, Debug)]
pub struct Listing {
    /// The datasets the listing was taken of (missing ones are simply absent).
    pub of: Vec<String>,
    /// Oldest first (by creation transaction), so snapshots come in the order they were
    /// taken.
    pub rows: Vec<Row>,
}

impl Listing {
    /// Lists `datasets` (any of which may be missing), their snapshots and their direct
    /// children, with the size limit property `limit`.
    pub fn read(datasets: Vec<String>, limit: &str) -> Result<Listing> {
        let fields = format!(
            "name,type,guid,used,referenced,{limit},clones,origin,{}",
            crate::IMAGE_PROPERTY
        );
        let mut args = vec![
            "list",
            "-H",
            "-p",
            "-r",
            "-d",
            "1",
            "-t",
            "filesystem,volume,snapshot",
            "-s",
            "createtxg",
            "-o",
            &fields,
        ];
        args.extend(datasets.iter().map(String::as_str));
        // Missing datasets are reported on stderr with exit status 1; the others are listed.
        let out = match command::run("zfs", &args) {
            Ok(out) => out,
            Err(f) if classify(&f) == ErrorKind::NotFound => f.stdout,
            Err(f) => return Err(Error::new(classify(&f), f.to_string())),
        };
        let rows = out
            .lines()
            .filter_map(|line| {
                let mut fields = line.split('\t').map(str::to_owned);
                Some(Row {
                    name: fields.next()?,
                    kind: fields.next()?,
                    guid: fields.next()?,
                    used: fields.next()?,
                    referenced: fields.next()?,
                    limit: fields.next()?,
                    clones: fields.next()?,
                    origin: fields.next()?,
                    image: fields.next()?,
                })
            })
            .collect();
        Ok(Listing { of: datasets, rows })
    }

    /// The dataset's row, if it exists; an error if it is not a filesystem (a zvol of that
    /// name is somebody else's).
    pub fn filesystem(&self, dataset: &str) -> Result<Option<&Row>> {
        let Some(row) = self.rows.iter().find(|r| r.name == dataset) else {
            return Ok(None);
        };
        if row.kind != "filesystem" {
            return Err(Error::new(
                ErrorKind::Failed,
                format!(
                    "{dataset} is a {}, not a filesystem; reimage leaves it alone",
                    row.kind
                ),
            ));
        }
        Ok(Some(row))
    }

    /// What the listing says after `zfs rename FROM TO`: the dataset, its snapshots and
    /// children under the new name.
    pub fn renamed(&mut self, from: &str, to: &str) {
        for row in &mut self.rows {
            if let Some(rest) = row.name.strip_prefix(from) {
                if rest.is_empty() || rest.starts_with(['@', '/']) {
                    row.name = format!("{to}{rest}");
                }
            }
        }
    }

    /// Every snapshot in the dataset's subtree as `(name, clones)`, oldest first, if the
    /// listing holds them all: when the dataset has no datasets below it (the listing goes
    /// one level down, so it would show them).
    pub fn subtree_snapshots(&self, dataset: &str) -> Option<Vec<(String, Vec<String>)>> {
        let below = format!("{dataset}/");
        if self.rows.iter().any(|r| r.name.starts_with(&below)) {
            return None;
        }
        let own = format!("{dataset}@");
        Some(
            self.rows
                .iter()
                .filter(|r| r.name.starts_with(&own))
                .map(|r| (r.name.clone(), clone_list(&r.clones)))
                .collect(),
        )
    }

    /// The names (after the `@`) of the dataset's snapshots, oldest first.
    pub fn snapshots<'a>(&'a self, dataset: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.rows.iter().filter_map(move |r| {
            r.name
                .strip_prefix(dataset)
                .and_then(|rest| rest.strip_prefix('@'))
        })
    }
}

/// The clones in a `clones` field: comma-separated, `-` or empty for none.
pub fn clone_list(field: &str) -> Vec<String> {
    field
        .split(',')
        .filter(|c| !c.is_empty() && *c != "-")
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, kind: &str, clones: &str) -> Row {
        Row {
            name: name.into(),
            kind: kind.into(),
            guid: "1".into(),
            used: "0".into(),
            referenced: "0".into(),
            limit: "0".into(),
            clones: clones.into(),
            origin: "-".into(),
            image: "-".into(),
        }
    }

    #[test]
    fn subtree_snapshots_come_from_the_listing_only_without_nested_datasets() {
        let mut listing = Listing {
            of: vec!["p/v".into()],
            rows: vec![
                row("p/v", "filesystem", "-"),
                row("p/v@a", "snapshot", ""),
                row("p/v@b", "snapshot", "p/x,p/y"),
                row("p/vw", "filesystem", "-"),
                row("p/vw@c", "snapshot", ""),
            ],
        };
        assert_eq!(
            listing.subtree_snapshots("p/v"),
            Some(vec![
                ("p/v@a".to_owned(), vec![]),
                ("p/v@b".to_owned(), vec!["p/x".to_owned(), "p/y".to_owned()]),
            ])
        );
        listing.rows.push(row("p/v/inner", "filesystem", "-"));
        assert_eq!(listing.subtree_snapshots("p/v"), None);
    }
}
