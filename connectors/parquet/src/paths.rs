//! Turning user-given paths (files, directories, globs) into a sorted list of files.

use std::path::PathBuf;

use tidepool_pipeline::{Error, Result};

/// Expands each input into files: a glob (`data/*.parquet`) to its matches, a directory
/// to the `.parquet` files directly inside it, a file to itself. The result is sorted
/// and de-duplicated so the replay order does not depend on the order of the arguments'
/// expansion. An input that matches nothing is an error, not an empty replay.
pub fn expand_inputs(inputs: &[String]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for input in inputs {
        let before = files.len();
        if input.contains(['*', '?', '[']) {
            let paths = glob::glob(input)
                .map_err(|e| Error::Config(format!("bad glob pattern {input:?}: {e}")))?;
            for path in paths {
                let path = path.map_err(|e| {
                    let at = e.path().to_path_buf();
                    Error::io(at, e.into())
                })?;
                if path.is_file() {
                    files.push(path);
                }
            }
        } else {
            let path = PathBuf::from(input);
            let meta = std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?;
            if meta.is_dir() {
                let entries = std::fs::read_dir(&path).map_err(|e| Error::io(&path, e))?;
                for entry in entries {
                    let entry = entry.map_err(|e| Error::io(&path, e))?;
                    let p = entry.path();
                    if p.is_file() && p.extension().is_some_and(|x| x == "parquet") {
                        files.push(p);
                    }
                }
            } else {
                files.push(path);
            }
        }
        if files.len() == before {
            return Err(Error::Config(format!("input {input:?} matches no files")));
        }
    }
    files.sort();
    files.dedup();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_dirs_globs_and_files() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["b.parquet", "a.parquet", "c.csv"] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        let d = dir.path().display().to_string();
        let files = expand_inputs(std::slice::from_ref(&d)).unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
            .collect();
        assert_eq!(names, vec!["a.parquet", "b.parquet"]);
        let files = expand_inputs(&[format!("{d}/*.csv"), format!("{d}/a.parquet")]).unwrap();
        assert_eq!(files.len(), 2);
        let err = expand_inputs(&[format!("{d}/*.json")]).unwrap_err();
        assert!(err.to_string().contains("matches no files"), "{err}");
        let err = expand_inputs(&[format!("{d}/missing.parquet")]).unwrap_err();
        assert!(err.to_string().contains("missing.parquet"), "{err}");
    }
}
