//! `realm models`: finds GGUF files under some directories and describes each from its header
//! (architecture, parameter count, tensor types, context length, size). Split models
//! (`name-00001-of-00003.gguf`, `split.*` metadata) are shown as one entry; files without tensors
//! are marked vocab-only; unreadable files are listed with their error.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::Result;
use realm_engine::gguf::GgufFile;
use serde::Serialize;

#[derive(clap::Args)]
pub struct Args {
    /// Directories (searched recursively) or files. Default: ./models and the colon-separated
    /// directories of $REALM_MODELS.
    dirs: Vec<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// One model: a single file, or all the parts of a split model that were found.
#[derive(Debug, Serialize)]
pub struct ModelEntry {
    /// The file (for a split model, its first part).
    pub path: PathBuf,
    pub name: Option<String>,
    pub architecture: Option<String>,
    /// Sum of the element counts of all tensors.
    pub parameters: u64,
    /// Tensor count per type, most frequent first.
    pub tensor_types: Vec<(String, usize)>,
    pub context_length: Option<u64>,
    /// Bytes, all parts together.
    pub file_size: u64,
    /// No tensors: a tokenizer-only GGUF.
    pub vocab_only: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub split: Option<SplitInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct SplitInfo {
    pub count: u32,
    pub parts: Vec<PathBuf>,
    /// Part numbers (1-based) that were expected but not found.
    pub missing: Vec<u32>,
}

/// What one file says about itself.
struct FileInfo {
    path: PathBuf,
    size: u64,
    meta: Result<Header, String>,
}

struct Header {
    name: Option<String>,
    arch: Option<String>,
    parameters: u64,
    types: BTreeMap<String, usize>,
    ctx: Option<u64>,
    n_tensors: usize,
    /// (part index from 0, part count) from `split.no` / `split.count`.
    split: Option<(u32, u32)>,
}

fn read_header(path: &Path) -> Result<Header, String> {
    // GgufFile maps the file and parses the header and tensor directory; tensor data pages are
    // never touched, so this stays cheap for multi-gigabyte files.
    let f = GgufFile::open(path).map_err(|e| e.to_string())?;
    let str_key = |k: &str| f.get(k).and_then(|v| v.as_str()).map(str::to_string);
    let arch = str_key("general.architecture");
    let ctx = arch
        .as_ref()
        .and_then(|a| f.get(&format!("{a}.context_length")))
        .and_then(|v| v.as_u64());
    let mut types = BTreeMap::new();
    let mut parameters = 0u64;
    for t in f.tensors() {
        parameters += t.n_elements();
        *types.entry(t.ty.name().to_string()).or_insert(0) += 1;
    }
    let split = match (
        f.get("split.no").and_then(|v| v.as_u64()),
        f.get("split.count").and_then(|v| v.as_u64()),
    ) {
        (Some(no), Some(count)) if count > 1 => Some((no as u32, count as u32)),
        _ => None,
    };
    Ok(Header {
        name: str_key("general.name"),
        arch,
        parameters,
        types,
        ctx,
        n_tensors: f.tensors().len(),
        split,
    })
}

/// `stem-00002-of-00005.gguf` → ("stem", 1, 5): the part index from 0 and the count.
pub fn split_from_name(path: &Path) -> Option<(String, u32, u32)> {
    let name = path.file_name()?.to_str()?;
    let stem = name.strip_suffix(".gguf").or_else(|| {
        name.len()
            .checked_sub(5)
            .filter(|&i| name.is_char_boundary(i) && name[i..].eq_ignore_ascii_case(".gguf"))
            .map(|i| &name[..i])
    })?;
    // "-NNNNN-of-NNNNN" is 15 bytes.
    let cut = stem.len().checked_sub(15)?;
    let (base, tail) = (stem.get(..cut)?, stem.get(cut..)?);
    let b = tail.as_bytes();
    let digits = |r: std::ops::Range<usize>| {
        b[r.clone()]
            .iter()
            .all(u8::is_ascii_digit)
            .then(|| tail[r].parse::<u32>().ok())
            .flatten()
    };
    if b[0] != b'-' || &b[6..10] != b"-of-" {
        return None;
    }
    let (no, count) = (digits(1..6)?, digits(10..15)?);
    (no >= 1 && no <= count && count > 1).then(|| (base.to_string(), no - 1, count))
}

fn is_gguf(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// Every `.gguf` under `roots` (recursively, following links, each directory once), sorted.
pub fn discover(roots: &[PathBuf]) -> (Vec<PathBuf>, Vec<(PathBuf, String)>) {
    let mut found = Vec::new();
    let mut errors = Vec::new();
    let mut seen_dirs = HashSet::new();
    let mut seen_files = HashSet::new();
    let mut stack: Vec<PathBuf> = roots.iter().rev().cloned().collect();
    while let Some(p) = stack.pop() {
        let meta = match std::fs::metadata(&p) {
            Ok(m) => m,
            Err(e) => {
                errors.push((p, e.to_string()));
                continue;
            }
        };
        if meta.is_dir() {
            let canon = std::fs::canonicalize(&p).unwrap_or_else(|_| p.clone());
            if !seen_dirs.insert(canon) {
                continue;
            }
            let entries = match std::fs::read_dir(&p) {
                Ok(r) => r,
                Err(e) => {
                    errors.push((p, e.to_string()));
                    continue;
                }
            };
            let mut children: Vec<PathBuf> =
                entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
            children.sort();
            for c in children.into_iter().rev() {
                if is_gguf(&c) || std::fs::metadata(&c).is_ok_and(|m| m.is_dir()) {
                    stack.push(c);
                }
            }
        } else if is_gguf(&p) || roots.contains(&p) {
            let canon = std::fs::canonicalize(&p).unwrap_or_else(|_| p.clone());
            if seen_files.insert(canon) {
                found.push(p);
            }
        }
    }
    found.sort();
    (found, errors)
}

/// Reads every file and groups the parts of split models.
pub fn describe(files: &[PathBuf]) -> Vec<ModelEntry> {
    let infos: Vec<FileInfo> = files
        .iter()
        .map(|p| FileInfo {
            path: p.clone(),
            size: std::fs::metadata(p).map(|m| m.len()).unwrap_or(0),
            meta: read_header(p),
        })
        .collect();

    // Group split parts by (directory, base name, count).
    let mut groups: BTreeMap<(PathBuf, String, u32), Vec<(u32, FileInfo)>> = BTreeMap::new();
    let mut entries = Vec::new();
    for info in infos {
        let from_name = split_from_name(&info.path);
        let from_meta = info.meta.as_ref().ok().and_then(|h| h.split);
        let key = match (&from_name, from_meta) {
            (Some((base, no, count)), meta) => {
                // Metadata, when present, is the authority on the part number and count.
                let (no, count) = meta.unwrap_or((*no, *count));
                Some((base.clone(), no, count))
            }
            (None, Some((no, count))) => {
                let stem = info.path.file_stem().unwrap_or_default().to_string_lossy();
                Some((stem.into_owned(), no, count))
            }
            (None, None) => None,
        };
        match key {
            Some((base, no, count)) => {
                let dir = info.path.parent().unwrap_or(Path::new("")).to_path_buf();
                groups
                    .entry((dir, base, count))
                    .or_default()
                    .push((no, info));
            }
            None => entries.push(single(info)),
        }
    }
    for ((_, _, count), mut parts) in groups {
        parts.sort_by_key(|(no, _)| *no);
        entries.push(merge_split(count, parts));
    }
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    entries
}

fn histogram(types: &BTreeMap<String, usize>) -> Vec<(String, usize)> {
    let mut v: Vec<(String, usize)> = types.iter().map(|(k, &n)| (k.clone(), n)).collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v
}

fn single(info: FileInfo) -> ModelEntry {
    match info.meta {
        Ok(h) => ModelEntry {
            path: info.path,
            name: h.name,
            architecture: h.arch,
            parameters: h.parameters,
            tensor_types: histogram(&h.types),
            context_length: h.ctx,
            file_size: info.size,
            vocab_only: h.n_tensors == 0,
            split: None,
            error: None,
        },
        Err(e) => ModelEntry {
            path: info.path,
            name: None,
            architecture: None,
            parameters: 0,
            tensor_types: Vec::new(),
            context_length: None,
            file_size: info.size,
            vocab_only: false,
            split: None,
            error: Some(e),
        },
    }
}

fn merge_split(count: u32, parts: Vec<(u32, FileInfo)>) -> ModelEntry {
    let present: HashSet<u32> = parts.iter().map(|(no, _)| *no).collect();
    let missing: Vec<u32> = (0..count)
        .filter(|n| !present.contains(n))
        .map(|n| n + 1)
        .collect();
    let mut e = ModelEntry {
        path: parts[0].1.path.clone(),
        name: None,
        architecture: None,
        parameters: 0,
        tensor_types: Vec::new(),
        context_length: None,
        file_size: 0,
        vocab_only: false,
        split: None,
        error: None,
    };
    let mut types = BTreeMap::new();
    let mut n_tensors = 0;
    let mut errors = Vec::new();
    let mut paths = Vec::new();
    for (_, info) in parts {
        e.file_size += info.size;
        paths.push(info.path.clone());
        match info.meta {
            Ok(h) => {
                // The first part carries the model's metadata; later parts may repeat it.
                e.name = e.name.or(h.name);
                e.architecture = e.architecture.or(h.arch);
                e.context_length = e.context_length.or(h.ctx);
                e.parameters += h.parameters;
                n_tensors += h.n_tensors;
                for (k, n) in h.types {
                    *types.entry(k).or_insert(0) += n;
                }
            }
            Err(err) => errors.push(format!("{}: {err}", info.path.display())),
        }
    }
    e.tensor_types = histogram(&types);
    e.vocab_only = n_tensors == 0 && errors.is_empty();
    if !missing.is_empty() {
        errors.push(format!(
            "incomplete split model: part(s) {} of {count} missing",
            missing
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if !errors.is_empty() {
        e.error = Some(errors.join("; "));
    }
    e.split = Some(SplitInfo {
        count,
        parts: paths,
        missing,
    });
    e
}

/// 268098176 → "268.1M".
pub fn human_count(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2}B", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1}M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1}K", n / 1e3)
    } else {
        format!("{n}")
    }
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn default_roots() -> Vec<PathBuf> {
    let mut roots = vec![PathBuf::from("models")];
    if let Ok(v) = std::env::var("REALM_MODELS") {
        roots.extend(v.split(':').filter(|s| !s.is_empty()).map(PathBuf::from));
    }
    roots
}

pub fn run(a: Args) -> Result<()> {
    let explicit = !a.dirs.is_empty();
    let roots = if explicit { a.dirs } else { default_roots() };
    let (files, walk_errors) = discover(&roots);
    let mut entries = describe(&files);
    // A default root that does not exist is not worth a complaint; one the user named is.
    for (path, err) in walk_errors {
        if explicit || path.exists() {
            entries.push(ModelEntry {
                path,
                name: None,
                architecture: None,
                parameters: 0,
                tensor_types: Vec::new(),
                context_length: None,
                file_size: 0,
                vocab_only: false,
                split: None,
                error: Some(err),
            });
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(());
    }
    if entries.is_empty() {
        eprintln!(
            "no .gguf files found under {}",
            roots
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        return Ok(());
    }
    print!("{}", table(&entries));
    Ok(())
}

pub fn table(entries: &[ModelEntry]) -> String {
    let header = ["PATH", "NAME", "ARCH", "PARAMS", "CTX", "SIZE", "TYPES"];
    let mut rows: Vec<[String; 7]> = Vec::new();
    for e in entries {
        let mut path = e.path.display().to_string();
        if let Some(s) = &e.split {
            path.push_str(&format!(
                " (+{} of {} parts)",
                s.parts.len().saturating_sub(1),
                s.count
            ));
        }
        let types = if let Some(err) = &e.error {
            format!("error: {err}")
        } else if e.vocab_only {
            "vocab only".to_string()
        } else {
            e.tensor_types
                .iter()
                .map(|(t, n)| format!("{t}×{n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let dash = || "-".to_string();
        rows.push([
            path,
            e.name.clone().unwrap_or_else(dash),
            e.architecture.clone().unwrap_or_else(dash),
            if e.parameters > 0 {
                human_count(e.parameters)
            } else {
                dash()
            },
            e.context_length.map(|c| c.to_string()).unwrap_or_else(dash),
            human_bytes(e.file_size),
            types,
        ]);
    }
    let mut widths = header.map(|h| h.chars().count());
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r.iter()) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: &[String], out: &mut String| {
        let last = cells.len() - 1;
        for (i, c) in cells.iter().enumerate() {
            if i == last {
                out.push_str(c);
            } else {
                let pad = widths[i] - c.chars().count();
                out.push_str(c);
                out.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push('\n');
    };
    line(&header.map(String::from), &mut out);
    for r in &rows {
        line(r, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_names() {
        let p = |s: &str| split_from_name(Path::new(s));
        assert_eq!(
            p("dir/llama-8b-00002-of-00005.gguf"),
            Some(("llama-8b".into(), 1, 5))
        );
        assert_eq!(p("x-00001-of-00002.GGUF"), Some(("x".into(), 0, 2)));
        assert_eq!(p("x-00001-of-00001.gguf"), None);
        assert_eq!(p("x-00003-of-00002.gguf"), None);
        assert_eq!(p("x-00000-of-00002.gguf"), None);
        assert_eq!(p("x-0001-of-00002.gguf"), None);
        assert_eq!(p("model.gguf"), None);
        assert_eq!(p("-00001-of-00002.gguf"), Some((String::new(), 0, 2)));
        assert_eq!(p("é-00001-of-00002.gguf"), Some(("é".into(), 0, 2)));
    }

    #[test]
    fn human_units() {
        assert_eq!(human_count(268_098_176), "268.1M");
        assert_eq!(human_count(8_030_261_248), "8.03B");
        assert_eq!(human_count(999), "999");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(253_000_000), "241.3 MiB");
    }
}
